//! The outbox relay: publishes every committed event to RabbitMQ, in commit order, at
//! least once. It reads the global log from its checkpoint in Postgres, publishes a
//! batch with publisher confirms (persistent messages on the `<prefix>.events` topic
//! exchange, EVENTS.md's envelope and properties), and only then advances the
//! checkpoint. Whatever fails (broker gone, process killed), the next pass starts from
//! the checkpoint again: events may be published twice, never skipped.
//!
//! Only one relay publishes at a time across processes: each holds a session-level
//! advisory lock on a connection of its own; when the holder dies its connection
//! closes, the lock is released, and another process's relay takes over.
//!
//! At shutdown (`flush`), the relay publishes what is committed, so that the last
//! requests' events do not wait for the next start, then returns.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, ExchangeKind};

use crate::app::ComponentState;
use crate::broker::{Broker, BrokerError};
use crate::config::DatabaseConfig;
use crate::eventstore::{self, GlobalPosition, RecordedEvent};

/// Events published per pass (one batch of confirms, then one checkpoint write).
const BATCH: i64 = 500;
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
    /// How long to wait when there is nothing to publish.
    pub idle_poll: Duration,
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("event store: {0}")]
    EventStore(#[from] eventstore::EventStoreError),
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("broker: {0}")]
    Channel(#[from] BrokerError),
    #[error("the broker refused event {0}")]
    Nacked(uuid::Uuid),
    #[error("{0}")]
    Setup(String),
}

/// How a leadership term ended without failing.
enum Term {
    /// Another relay leads: try again later.
    Standby,
    /// Asked to flush, and nothing is left to publish (or another relay leads).
    Flushed,
}

/// Runs the relay until the task is dropped, or until `flush` turns true and it has
/// published everything committed: waits to lead, connects, publishes; starts over
/// (with backoff) after any failure. A flush cannot finish while the broker is down:
/// the caller bounds it.
pub async fn run(config: RelayConfig, flush: tokio::sync::watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(200);
    config.status.set_relay(ComponentState::Connecting);
    loop {
        match lead_and_publish(&config, &flush).await {
            Ok(Term::Standby) => backoff = Duration::from_millis(200),
            Ok(Term::Flushed) => {
                config.status.set_relay(ComponentState::Disabled);
                return;
            }
            Err(error) => {
                config.status.set_relay(ComponentState::Connecting);
                tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "relay stopped; starting over");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// One leadership term.
async fn lead_and_publish(
    config: &RelayConfig,
    flush: &tokio::sync::watch::Receiver<bool>,
) -> Result<Term, RelayError> {
    // A pool of one, for this term only: dropping it closes the connection, which is
    // what releases the lock.
    let pool = DatabaseConfig { database_url: config.database_url.clone(), database_pool_size: 1 }
        .pool()
        .map_err(|error| RelayError::Setup(error.to_string()))?;
    let client = pool.get().await.map_err(|error| RelayError::Setup(error.to_string()))?;
    let result = async {
        let led: bool = client.query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK]).await?.get(0);
        if !led {
            if *flush.borrow() {
                return Ok(Term::Flushed); // the leader publishes
            }
            config.status.set_relay(ComponentState::Standby);
            tokio::time::sleep(Duration::from_secs(1)).await;
            return Ok(Term::Standby);
        }
        tracing::info!(exchange = %config.exchange, "relay leading");
        // Confirm mode; dropped with the term (a broken one is discarded by the pool).
        let channel = config.broker.channel().await?;
        channel
            .exchange_declare(
                config.exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        config.status.set_relay(ComponentState::Up);
        // Once flushing: the last event committed when the flush began, which must be
        // published before the relay stops (None: there are no events).
        let mut flush_until: Option<Option<GlobalPosition>> = None;
        loop {
            let published = publish_pass(&client, &channel, &config.exchange).await?;
            if *flush.borrow() {
                // Nothing left to read is not enough: the log holds back events
                // committed after a transaction still running (in any database of the
                // cluster); those are waited for. Events committed later (by other
                // processes) are not: the next relay publishes them.
                if flush_until.is_none() {
                    flush_until = Some(eventstore::last_committed(&client).await?);
                }
                let done = match flush_until.flatten() {
                    None => true,
                    Some(last) => checkpoint(&client).await? >= last,
                };
                if done {
                    tracing::info!("relay flushed: every committed event is published");
                    return Ok(Term::Flushed);
                }
            }
            if published == 0 {
                // Idle: notice a lost broker now, not at the next event (and let /ready say so).
                if !channel.usable() {
                    return Err(RelayError::Setup("the broker connection was lost".into()));
                }
                tokio::time::sleep(config.idle_poll).await;
            }
        }
    }
    .await;
    drop(client);
    drop(pool);
    result
}

/// Publishes the next batch after the checkpoint; returns how many were published.
async fn publish_pass(
    client: &deadpool_postgres::Client,
    channel: &lapin::Channel,
    exchange: &str,
) -> Result<usize, RelayError> {
    let after = checkpoint(client).await?;
    let events = eventstore::read_all(client, after, BATCH).await?;
    let Some(last) = events.last() else { return Ok(0) };
    // Published in order on one channel (the broker keeps that order), then confirmed.
    // A broker that stops answering (or blocks us) must not hold the leadership forever.
    let silent = |what: &str| RelayError::Setup(format!("the broker did not {what} within {CONFIRM_TIMEOUT:?}"));
    let mut confirms = Vec::with_capacity(events.len());
    for event in &events {
        let body = envelope(event);
        let publish = channel.basic_publish(
            exchange.into(),
            routing_key(&event.event_type).as_str().into(),
            BasicPublishOptions::default(),
            &body,
            properties(event),
        );
        let confirm = tokio::time::timeout(CONFIRM_TIMEOUT, publish).await.map_err(|_| silent("take a message"))??;
        confirms.push(confirm);
    }
    for (index, confirm) in confirms.into_iter().enumerate() {
        let confirmation =
            tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await.map_err(|_| silent("confirm a message"))??;
        if !confirmation.is_ack() {
            // What was confirmed before it is not published again.
            if let Some(confirmed) = index.checked_sub(1) {
                save_checkpoint(client, events[confirmed].global_position()).await?;
            }
            return Err(RelayError::Nacked(events[index].id));
        }
    }
    save_checkpoint(client, last.global_position()).await?;
    Ok(events.len())
}

async fn checkpoint(client: &deadpool_postgres::Client) -> Result<GlobalPosition, RelayError> {
    let row = client.query_opt("SELECT tx::text, position FROM checkpoints WHERE name = $1", &[&CHECKPOINT]).await?;
    Ok(match row {
        None => GlobalPosition::START,
        Some(row) => {
            let tx: String = row.get(0);
            let tx = tx.parse().map_err(|_| RelayError::Setup(format!("unreadable checkpoint tx {tx}")))?;
            GlobalPosition { tx, position: row.get(1) }
        }
    })
}

async fn save_checkpoint(client: &deadpool_postgres::Client, at: GlobalPosition) -> Result<(), RelayError> {
    client
        .execute(
            "INSERT INTO checkpoints (name, tx, position) VALUES ($1, $2::text::xid8, $3)
             ON CONFLICT (name) DO UPDATE SET tx = excluded.tx, position = excluded.position",
            &[&CHECKPOINT, &at.tx.to_string(), &at.position],
        )
        .await?;
    Ok(())
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

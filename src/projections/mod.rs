//! Read models (`sessions`, `assets`) derived from events. `apply` runs inside the
//! append's transaction so every read sees its own writes; `replay` rebuilds the tables
//! from the global log alone. Everything written here comes from the event (payload,
//! version, `recorded_at`), never from the clock, so a replay reproduces the tables
//! exactly.

use deadpool_postgres::GenericClient;

pub mod read;

use crate::domain::asset::AssetEvent;
use crate::domain::session::SessionEvent;
use crate::domain::DomainEvent;
use crate::eventstore::{self, EventStoreError, GlobalPosition, RecordedEvent};

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("event store: {0}")]
    EventStore(#[from] EventStoreError),
    #[error("event {id} ({event_type}) has an unreadable payload: {source}")]
    BadPayload { id: uuid::Uuid, event_type: String, source: serde_json::Error },
}

/// Which aggregate's events a stream holds, from its `<category>-<id>` name.
fn category(stream: &str) -> &str {
    stream.split_once('-').map_or(stream, |(category, _)| category)
}

fn decode<E: DomainEvent>(event: &RecordedEvent) -> Result<Option<E>, ProjectionError> {
    E::from_parts(&event.event_type, &event.data).transpose().map_err(|source| ProjectionError::BadPayload {
        id: event.id,
        event_type: event.event_type.clone(),
        source,
    })
}

/// Updates the read models for one recorded event.
pub async fn apply(client: &impl GenericClient, event: &RecordedEvent) -> Result<(), ProjectionError> {
    match category(&event.stream) {
        "session" => {
            if let Some(session_event) = decode::<SessionEvent>(event)? {
                apply_session(client, event, &session_event).await?;
            }
        }
        "asset" => {
            if let Some(asset_event) = decode::<AssetEvent>(event)? {
                apply_asset(client, event, &asset_event).await?;
            }
        }
        _ => {}
    }
    Ok(())
}

async fn apply_session(
    client: &impl GenericClient,
    event: &RecordedEvent,
    session_event: &SessionEvent,
) -> Result<(), ProjectionError> {
    match session_event {
        SessionEvent::SessionRegistered(d) | SessionEvent::SessionUpdated(d) => {
            let statement = client
                .prepare_cached(
                    "INSERT INTO sessions (id_session, session_uuid, session_name, id_creator_uuid, session_users,
                         session_participants, session_devices, created_at, updated_at, version)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9)
                     ON CONFLICT (id_session) DO UPDATE SET session_uuid = $2, session_name = $3, id_creator_uuid = $4,
                         session_users = $5, session_participants = $6, session_devices = $7, updated_at = $8, version = $9",
                )
                .await?;
            client
                .execute(
                    &statement,
                    &[
                        &d.id_session.get(),
                        &d.session_uuid,
                        &d.session_name,
                        &d.id_creator_uuid,
                        &d.session_users,
                        &d.session_participants,
                        &d.session_devices,
                        &event.recorded_at,
                        &event.version,
                    ],
                )
                .await?;
        }
        SessionEvent::SessionDeleted(deleted) => {
            let statement = client.prepare_cached("DELETE FROM sessions WHERE id_session = $1").await?;
            client.execute(&statement, &[&deleted.id_session.get()]).await?;
        }
    }
    Ok(())
}

async fn apply_asset(
    client: &impl GenericClient,
    event: &RecordedEvent,
    asset_event: &AssetEvent,
) -> Result<(), ProjectionError> {
    match asset_event {
        AssetEvent::AssetUploaded(a) => {
            let statement = client
                .prepare_cached(
                    "INSERT INTO assets (asset_uuid, id_session, asset_name, asset_original_filename, asset_type,
                         asset_file_size, asset_sha256, asset_datetime, directory, tags, metadata, asset_status,
                         asset_created_at, creator_kind, creator_uuid, asset_source, asset_version)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, coalesce($8::timestamptz, $12::timestamptz), $9, $10, $11, 'available', $12, $13, $14, $15, $16)",
                )
                .await?;
            client
                .execute(
                    &statement,
                    &[
                        &a.asset_uuid,
                        &a.id_session.get(),
                        &a.asset_name.as_str(),
                        &a.asset_original_filename.as_str(),
                        &a.asset_type.as_str(),
                        &(a.asset_file_size as i64),
                        &a.asset_sha256.as_str(),
                        &a.asset_datetime,
                        &a.directory.as_str(),
                        &serde_json::to_value(&a.tags).unwrap_or_default(),
                        &serde_json::Value::Object(a.metadata.clone()),
                        &event.recorded_at,
                        &a.asset_creator.kind.as_str(),
                        &a.asset_creator.uuid,
                        &a.asset_source.as_str(),
                        &event.version,
                    ],
                )
                .await?;
        }
        AssetEvent::AssetRenamed(renamed) => {
            let statement = client
                .prepare_cached(
                    "UPDATE assets SET asset_original_filename = $2, asset_version = $3 WHERE asset_uuid = $1",
                )
                .await?;
            client
                .execute(&statement, &[&renamed.asset_uuid, &renamed.asset_original_filename.as_str(), &event.version])
                .await?;
        }
        AssetEvent::AssetDeleted(deleted) => {
            let statement = client
                .prepare_cached("UPDATE assets SET asset_status = 'deleted', asset_version = $2 WHERE asset_uuid = $1")
                .await?;
            client.execute(&statement, &[&deleted.asset_uuid, &event.version]).await?;
        }
    }
    Ok(())
}

/// How many events a replay reads per round trip.
const REPLAY_BATCH: i64 = 5_000;

/// Empties the read models and rebuilds them from every event, in one transaction so
/// readers see either the old tables or the rebuilt ones. Returns the events applied.
///
/// The lock is taken before the snapshot (REPEATABLE READ takes it at the first query):
/// writers that already touched the read models have committed and are in the snapshot;
/// writers that have not wait for the lock and update the rebuilt tables afterwards.
pub async fn replay(client: &mut deadpool_postgres::Client) -> Result<u64, ProjectionError> {
    let tx = client.build_transaction().isolation_level(tokio_postgres::IsolationLevel::RepeatableRead).start().await?;
    tx.batch_execute("LOCK TABLE sessions, assets IN ACCESS EXCLUSIVE MODE").await?;
    tx.batch_execute("TRUNCATE sessions, assets").await?;
    let mut after = GlobalPosition::START;
    let mut applied = 0;
    loop {
        let batch = eventstore::read_all_in_snapshot(&tx, after, REPLAY_BATCH).await?;
        let Some(last) = batch.last() else { break };
        after = last.global_position();
        for event in &batch {
            apply(&tx, event).await?;
        }
        applied += batch.len() as u64;
    }
    tx.commit().await?;
    Ok(applied)
}

//! Read models (`sessions`, `assets`, `jobs`, `uploads`, `archives`) derived from events. `apply` runs inside the
//! append's transaction so every read sees its own writes; `replay` rebuilds the tables
//! from the global log alone. Everything written here comes from the event (payload,
//! version, `recorded_at`), never from the clock, so a replay reproduces the tables
//! exactly.

use std::collections::hash_map::{Entry, HashMap};

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use futures::TryStreamExt;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

mod archives;
mod jobs;
pub mod read;
mod uploads;

use crate::domain::archive::{Archive, ArchiveEvent};
use crate::domain::asset::Asset;
use crate::domain::asset::{AssetEvent, AssetUploaded};
use crate::domain::job::{Job, JobEvent};
use crate::domain::session::Session;
use crate::domain::session::{SessionDetails, SessionEvent};
use crate::domain::upload::{Upload, UploadEvent};
use crate::domain::Aggregate;
use crate::domain::DomainEvent;
use crate::eventstore::{self, EventStoreError, RecordedEvent};

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
        Session::CATEGORY => {
            if let Some(session_event) = decode::<SessionEvent>(event)? {
                apply_session(client, event, &session_event).await?;
            }
        }
        Asset::CATEGORY => {
            if let Some(asset_event) = decode::<AssetEvent>(event)? {
                apply_asset(client, event, &asset_event).await?;
            }
        }
        Job::CATEGORY => {
            if let Some(job_event) = decode::<JobEvent>(event)? {
                jobs::apply(client, event, &job_event).await?;
            }
        }
        Upload::CATEGORY => {
            if let Some(upload_event) = decode::<UploadEvent>(event)? {
                uploads::apply(client, event, &upload_event).await?;
            }
        }
        Archive::CATEGORY => {
            if let Some(archive_event) = decode::<ArchiveEvent>(event)? {
                archives::apply(client, event, &archive_event).await?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// A `sessions` row as an event makes it (columns in table order).
#[derive(Debug, Clone)]
struct SessionRow {
    id_session: i64,
    session_uuid: uuid::Uuid,
    session_name: String,
    id_creator_uuid: Option<uuid::Uuid>,
    session_users: Vec<uuid::Uuid>,
    session_participants: Vec<uuid::Uuid>,
    session_devices: Vec<uuid::Uuid>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    version: i64,
    /// Of the registration; an update keeps it (see `read::SessionInfo::owns`).
    registered_position: i64,
}

impl SessionRow {
    /// The row after a registration or an update (an update keeps `created_at`).
    fn registered(d: &SessionDetails, event: &RecordedEvent) -> Self {
        Self {
            id_session: d.id_session.get(),
            session_uuid: d.session_uuid,
            session_name: d.session_name.clone(),
            id_creator_uuid: d.id_creator_uuid,
            session_users: d.session_users.clone(),
            session_participants: d.session_participants.clone(),
            session_devices: d.session_devices.clone(),
            created_at: event.recorded_at,
            updated_at: event.recorded_at,
            version: event.version,
            registered_position: event.position,
        }
    }

    const COLUMNS: &'static str = "id_session, session_uuid, session_name, id_creator_uuid, session_users, \
        session_participants, session_devices, created_at, updated_at, version, registered_position";
    const TYPES: [Type; 11] = [
        Type::INT8,
        Type::UUID,
        Type::TEXT,
        Type::UUID,
        Type::UUID_ARRAY,
        Type::UUID_ARRAY,
        Type::UUID_ARRAY,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::INT8,
        Type::INT8,
    ];

    fn values(&self) -> [&(dyn ToSql + Sync); 11] {
        [
            &self.id_session,
            &self.session_uuid,
            &self.session_name,
            &self.id_creator_uuid,
            &self.session_users,
            &self.session_participants,
            &self.session_devices,
            &self.created_at,
            &self.updated_at,
            &self.version,
            &self.registered_position,
        ]
    }
}

/// An `assets` row as its upload makes it (columns in table order).
#[derive(Debug, Clone)]
struct AssetRow {
    asset_uuid: uuid::Uuid,
    id_session: i64,
    asset_name: String,
    asset_original_filename: String,
    asset_type: String,
    asset_file_size: i64,
    asset_sha256: String,
    asset_datetime: DateTime<Utc>,
    directory: String,
    tags: serde_json::Value,
    metadata: serde_json::Value,
    asset_status: &'static str,
    asset_created_at: DateTime<Utc>,
    creator_kind: String,
    creator_uuid: uuid::Uuid,
    asset_source: String,
    asset_version: i64,
    created_position: i64,
    /// As the event recorded them: none for events from before blobs had locations
    /// (read as local, at the uuid's key), so that replay reproduces the rows exactly.
    blob_backend: Option<&'static str>,
    blob_key: Option<String>,
    opentera_id_asset: Option<i64>,
}

impl AssetRow {
    fn uploaded(a: &AssetUploaded, event: &RecordedEvent) -> Self {
        Self {
            asset_uuid: a.asset_uuid,
            id_session: a.id_session.get(),
            asset_name: a.asset_name.as_str().to_owned(),
            asset_original_filename: a.asset_original_filename.as_str().to_owned(),
            asset_type: a.asset_type.as_str().to_owned(),
            asset_file_size: a.asset_file_size as i64,
            asset_sha256: a.asset_sha256.as_str().to_owned(),
            asset_datetime: a.asset_datetime.unwrap_or(event.recorded_at),
            directory: a.directory.as_str().to_owned(),
            tags: serde_json::to_value(&a.tags).unwrap_or_default(),
            metadata: serde_json::Value::Object(a.metadata.clone()),
            asset_status: STATUS_AVAILABLE,
            asset_created_at: event.recorded_at,
            creator_kind: a.asset_creator.kind.as_str().to_owned(),
            creator_uuid: a.asset_creator.uuid,
            asset_source: a.asset_source.as_str().to_owned(),
            asset_version: event.version,
            created_position: event.position,
            blob_backend: a.blob.as_ref().map(|blob| blob.backend.as_str()),
            blob_key: a.blob.as_ref().map(|blob| blob.key.clone()),
            opentera_id_asset: a.id_asset,
        }
    }

    const COLUMNS: &'static str = "asset_uuid, id_session, asset_name, asset_original_filename, asset_type, \
        asset_file_size, asset_sha256, asset_datetime, directory, tags, metadata, asset_status, asset_created_at, \
        creator_kind, creator_uuid, asset_source, asset_version, created_position, blob_backend, blob_key, \
        opentera_id_asset";
    const TYPES: [Type; 21] = [
        Type::UUID,
        Type::INT8,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::INT8,
        Type::TEXT,
        Type::TIMESTAMPTZ,
        Type::TEXT,
        Type::JSONB,
        Type::JSONB,
        Type::TEXT,
        Type::TIMESTAMPTZ,
        Type::TEXT,
        Type::UUID,
        Type::TEXT,
        Type::INT8,
        Type::INT8,
        Type::TEXT,
        Type::TEXT,
        Type::INT8,
    ];

    fn values(&self) -> [&(dyn ToSql + Sync); 21] {
        [
            &self.asset_uuid,
            &self.id_session,
            &self.asset_name,
            &self.asset_original_filename,
            &self.asset_type,
            &self.asset_file_size,
            &self.asset_sha256,
            &self.asset_datetime,
            &self.directory,
            &self.tags,
            &self.metadata,
            &self.asset_status,
            &self.asset_created_at,
            &self.creator_kind,
            &self.creator_uuid,
            &self.asset_source,
            &self.asset_version,
            &self.created_position,
            &self.blob_backend,
            &self.blob_key,
            &self.opentera_id_asset,
        ]
    }
}

const STATUS_AVAILABLE: &str = "available";
const STATUS_DELETED: &str = "deleted";

async fn apply_session(
    client: &impl GenericClient,
    event: &RecordedEvent,
    session_event: &SessionEvent,
) -> Result<(), ProjectionError> {
    match session_event {
        SessionEvent::SessionRegistered(d) | SessionEvent::SessionUpdated(d) => {
            let statement = client
                .prepare_cached(&format!(
                    "INSERT INTO sessions ({}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                     ON CONFLICT (id_session) DO UPDATE SET session_uuid = $2, session_name = $3, id_creator_uuid = $4,
                         session_users = $5, session_participants = $6, session_devices = $7, updated_at = $9,
                         version = $10",
                    SessionRow::COLUMNS
                ))
                .await?;
            client.execute(&statement, &SessionRow::registered(d, event).values()).await?;
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
        AssetEvent::AssetUploaded(_) | AssetEvent::AssetImported(_) | AssetEvent::AssetCommitted(_) => {
            let a = match asset_event {
                AssetEvent::AssetImported(imported) => &imported.asset,
                AssetEvent::AssetCommitted(committed) => &committed.asset,
                AssetEvent::AssetUploaded(uploaded) => uploaded,
                _ => unreachable!("matched above"),
            };
            let statement = client
                .prepare_cached(&format!(
                    "INSERT INTO assets ({}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21)",
                    AssetRow::COLUMNS
                ))
                .await?;
            client.execute(&statement, &AssetRow::uploaded(a, event).values()).await?;
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
                .prepare_cached("UPDATE assets SET asset_status = $3, asset_version = $2 WHERE asset_uuid = $1")
                .await?;
            client.execute(&statement, &[&deleted.asset_uuid, &event.version, &STATUS_DELETED]).await?;
        }
    }
    Ok(())
}

/// The read models folded in memory by a replay, with the same effect per event as
/// [`apply`] has on the tables (the replay test holds the two to each other).
#[derive(Default)]
struct Rebuilt {
    sessions: HashMap<i64, SessionRow>,
    assets: HashMap<uuid::Uuid, AssetRow>,
    jobs: HashMap<uuid::Uuid, jobs::JobRow>,
    uploads: HashMap<uuid::Uuid, uploads::UploadRow>,
    archives: HashMap<uuid::Uuid, archives::ArchiveRow>,
}

impl Rebuilt {
    fn apply(&mut self, event: &RecordedEvent) -> Result<(), ProjectionError> {
        match category(&event.stream) {
            Session::CATEGORY => match decode::<SessionEvent>(event)? {
                Some(SessionEvent::SessionRegistered(d) | SessionEvent::SessionUpdated(d)) => {
                    let row = SessionRow::registered(&d, event);
                    match self.sessions.entry(row.id_session) {
                        Entry::Occupied(mut existing) => {
                            let (created_at, registered_position) =
                                (existing.get().created_at, existing.get().registered_position);
                            *existing.get_mut() = SessionRow { created_at, registered_position, ..row };
                        }
                        Entry::Vacant(vacant) => {
                            vacant.insert(row);
                        }
                    }
                }
                Some(SessionEvent::SessionDeleted(deleted)) => {
                    self.sessions.remove(&deleted.id_session.get());
                }
                None => {}
            },
            Asset::CATEGORY => match decode::<AssetEvent>(event)? {
                Some(AssetEvent::AssetUploaded(a)) => {
                    self.assets.insert(a.asset_uuid, AssetRow::uploaded(&a, event));
                }
                Some(AssetEvent::AssetImported(imported)) => {
                    self.assets.insert(imported.asset.asset_uuid, AssetRow::uploaded(&imported.asset, event));
                }
                Some(AssetEvent::AssetCommitted(committed)) => {
                    self.assets.insert(committed.asset.asset_uuid, AssetRow::uploaded(&committed.asset, event));
                }
                Some(AssetEvent::AssetRenamed(renamed)) => {
                    if let Some(row) = self.assets.get_mut(&renamed.asset_uuid) {
                        row.asset_original_filename = renamed.asset_original_filename.as_str().to_owned();
                        row.asset_version = event.version;
                    }
                }
                Some(AssetEvent::AssetDeleted(deleted)) => {
                    if let Some(row) = self.assets.get_mut(&deleted.asset_uuid) {
                        row.asset_status = STATUS_DELETED;
                        row.asset_version = event.version;
                    }
                }
                None => {}
            },
            Job::CATEGORY => {
                if let Some(job_event) = decode::<JobEvent>(event)? {
                    let uuid = jobs::job_uuid(&job_event);
                    match jobs::JobRow::apply(self.jobs.remove(&uuid), event, &job_event) {
                        Some(row) => self.jobs.insert(uuid, row),
                        None => None,
                    };
                }
            }
            Upload::CATEGORY => {
                if let Some(upload_event) = decode::<UploadEvent>(event)? {
                    let uuid = uploads::upload_uuid(&upload_event);
                    match uploads::UploadRow::apply(self.uploads.remove(&uuid), event, &upload_event) {
                        Some(row) => self.uploads.insert(uuid, row),
                        None => None,
                    };
                }
            }
            Archive::CATEGORY => {
                if let Some(archive_event) = decode::<ArchiveEvent>(event)? {
                    let uuid = archives::archive_uuid(&archive_event);
                    match archives::ArchiveRow::apply(self.archives.remove(&uuid), event, &archive_event) {
                        Some(row) => self.archives.insert(uuid, row),
                        None => None,
                    };
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Writes the rows with binary COPY into the (emptied) tables.
    async fn write(&self, tx: &tokio_postgres::Transaction<'_>) -> Result<(), ProjectionError> {
        copy_in(
            tx,
            "sessions",
            SessionRow::COLUMNS,
            &SessionRow::TYPES,
            self.sessions.values().map(SessionRow::values),
        )
        .await?;
        copy_in(tx, "assets", AssetRow::COLUMNS, &AssetRow::TYPES, self.assets.values().map(AssetRow::values)).await?;
        copy_in(tx, "jobs", jobs::JobRow::COLUMNS, &jobs::JobRow::TYPES, self.jobs.values().map(jobs::JobRow::values))
            .await?;
        let upload_rows = self.uploads.values().map(uploads::UploadRow::values);
        copy_in(tx, "uploads", uploads::UploadRow::COLUMNS, &uploads::UploadRow::TYPES, upload_rows).await?;
        let archive_rows = self.archives.values().map(archives::ArchiveRow::values);
        copy_in(tx, "archives", archives::ArchiveRow::COLUMNS, &archives::ArchiveRow::TYPES, archive_rows).await
    }
}

/// `COPY table (columns) FROM STDIN` in binary, one row per item of `rows`.
async fn copy_in<'a, const N: usize>(
    tx: &tokio_postgres::Transaction<'_>,
    table: &str,
    columns: &str,
    types: &[Type; N],
    rows: impl Iterator<Item = [&'a (dyn ToSql + Sync); N]>,
) -> Result<(), ProjectionError> {
    let sink = tx.copy_in(&format!("COPY {table} ({columns}) FROM STDIN (FORMAT binary)")).await?;
    let writer = BinaryCopyInWriter::new(sink, types);
    futures::pin_mut!(writer);
    for row in rows {
        writer.as_mut().write(&row).await?;
    }
    writer.finish().await?;
    Ok(())
}

/// Empties the read models and rebuilds them from every event, in one transaction so
/// readers see either the old tables or the rebuilt ones. Returns the events applied.
///
/// The lock is taken before the snapshot (REPEATABLE READ takes it at the first query):
/// writers that already touched the read models have committed and are in the snapshot;
/// writers that have not wait for the lock and update the rebuilt tables afterwards.
///
/// The log is streamed in one query and folded in memory (the final rows only: memory
/// grows with the number of sessions and assets, not events), then written with COPY:
/// one statement per event would make a replay as slow as a million round trips.
pub async fn replay(client: &mut deadpool_postgres::Client) -> Result<u64, ProjectionError> {
    let tx = client.build_transaction().isolation_level(tokio_postgres::IsolationLevel::RepeatableRead).start().await?;
    tx.batch_execute("LOCK TABLE sessions, assets, jobs, uploads, archives IN ACCESS EXCLUSIVE MODE").await?;
    tx.batch_execute("TRUNCATE sessions, assets, jobs, uploads, archives").await?;
    let mut rebuilt = Rebuilt::default();
    let mut applied = 0;
    let events = eventstore::stream_all_in_snapshot(&tx).await?;
    futures::pin_mut!(events);
    let started = std::time::Instant::now();
    while let Some(event) = events.try_next().await? {
        rebuilt.apply(&event)?;
        applied += 1;
    }
    let read = started.elapsed();
    rebuilt.write(&tx).await?;
    let written = started.elapsed();
    tx.commit().await?;
    tracing::info!(
        events = applied,
        sessions = rebuilt.sessions.len(),
        assets = rebuilt.assets.len(),
        jobs = rebuilt.jobs.len(),
        uploads = rebuilt.uploads.len(),
        archives = rebuilt.archives.len(),
        read_seconds = read.as_secs_f64(),
        write_seconds = (written - read).as_secs_f64(),
        commit_seconds = (started.elapsed() - written).as_secs_f64(),
        "replayed"
    );
    Ok(applied)
}

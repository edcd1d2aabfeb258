//! The `archives` read model. Like `uploads`: one pure fold ([`ArchiveRow::apply`])
//! serves the online projection (read the row, fold, write back) and the replay (folded
//! in memory), so the two cannot drift apart.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::types::{ToSql, Type};

use super::jobs::signed;
use super::ProjectionError;
use crate::domain::archive::{Archive, ArchiveEvent};
use crate::eventstore::RecordedEvent;

/// An `archives` row (columns in table order).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ArchiveRow {
    archive_uuid: uuid::Uuid,
    job_uuid: uuid::Uuid,
    id_session: Option<i64>,
    owner_kind: String,
    owner_uuid: uuid::Uuid,
    status: String,
    filename: String,
    size: Option<i64>,
    sha256: Option<String>,
    entries: Option<i64>,
    skipped_assets: Vec<uuid::Uuid>,
    blob_backend: Option<String>,
    blob_key: Option<String>,
    error: Option<String>,
    completed_at: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    version: i64,
    created_position: i64,
    uploader_uuid: Option<uuid::Uuid>,
}

impl ArchiveRow {
    /// The row after `event` (`None` before the archive's first event).
    pub fn apply(row: Option<Self>, recorded: &RecordedEvent, event: &ArchiveEvent) -> Option<Self> {
        let mut row = match (row, event) {
            (_, ArchiveEvent::ArchiveRequested(r)) => ArchiveRow {
                archive_uuid: r.archive_uuid,
                job_uuid: r.job_uuid,
                id_session: r.id_session.map(|id| id.get()),
                owner_kind: r.archive_owner.kind.as_str().to_owned(),
                owner_uuid: r.archive_owner.uuid,
                status: String::new(),
                filename: r.archive_original_filename.clone(),
                size: None,
                sha256: None,
                entries: None,
                skipped_assets: Vec::new(),
                blob_backend: None,
                blob_key: None,
                error: None,
                completed_at: None,
                expires_at: None,
                created_at: recorded.recorded_at,
                updated_at: recorded.recorded_at,
                version: recorded.version,
                created_position: recorded.position,
                uploader_uuid: None,
            },
            (None, _) => return None,
            (Some(mut row), event) => {
                match event {
                    ArchiveEvent::ArchiveRequested(_) => unreachable!("matched above"),
                    ArchiveEvent::ArchiveStarted(_) => row.error = None,
                    ArchiveEvent::ArchiveCompleted(c) => {
                        row.size = Some(signed(c.size));
                        row.sha256 = Some(c.sha256.as_str().to_owned());
                        row.entries = Some(signed(c.entries));
                        row.skipped_assets = c.skipped_assets.clone();
                        row.blob_backend = Some(c.blob.backend.as_str().to_owned());
                        row.blob_key = Some(c.blob.key.clone());
                        row.expires_at = Some(c.expires_at);
                        row.completed_at = Some(recorded.recorded_at);
                        row.uploader_uuid = c.archive_uploader.map(|a| a.uuid);
                    }
                    ArchiveEvent::ArchiveFailed(f) => row.error = Some(f.error.clone()),
                    ArchiveEvent::ArchiveExpired(_) | ArchiveEvent::ArchiveDeleted(_) => {}
                }
                row
            }
        };
        let mut archive = Archive::default();
        archive.apply(event);
        row.status = archive.status.as_str().to_owned();
        row.updated_at = recorded.recorded_at;
        row.version = recorded.version;
        Some(row)
    }

    pub const COLUMNS: &'static str = "archive_uuid, job_uuid, id_session, owner_kind, owner_uuid, status, \
        filename, size, sha256, entries, skipped_assets, blob_backend, blob_key, error, completed_at, expires_at, \
        created_at, updated_at, version, created_position, uploader_uuid";
    pub const TYPES: [Type; 21] = [
        Type::UUID,
        Type::UUID,
        Type::INT8,
        Type::TEXT,
        Type::UUID,
        Type::TEXT,
        Type::TEXT,
        Type::INT8,
        Type::TEXT,
        Type::INT8,
        Type::UUID_ARRAY,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::INT8,
        Type::INT8,
        Type::UUID,
    ];

    pub fn values(&self) -> [&(dyn ToSql + Sync); 21] {
        [
            &self.archive_uuid,
            &self.job_uuid,
            &self.id_session,
            &self.owner_kind,
            &self.owner_uuid,
            &self.status,
            &self.filename,
            &self.size,
            &self.sha256,
            &self.entries,
            &self.skipped_assets,
            &self.blob_backend,
            &self.blob_key,
            &self.error,
            &self.completed_at,
            &self.expires_at,
            &self.created_at,
            &self.updated_at,
            &self.version,
            &self.created_position,
            &self.uploader_uuid,
        ]
    }

    fn from_row(row: &tokio_postgres::Row) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            archive_uuid: row.try_get(0)?,
            job_uuid: row.try_get(1)?,
            id_session: row.try_get(2)?,
            owner_kind: row.try_get(3)?,
            owner_uuid: row.try_get(4)?,
            status: row.try_get(5)?,
            filename: row.try_get(6)?,
            size: row.try_get(7)?,
            sha256: row.try_get(8)?,
            entries: row.try_get(9)?,
            skipped_assets: row.try_get(10)?,
            blob_backend: row.try_get(11)?,
            blob_key: row.try_get(12)?,
            error: row.try_get(13)?,
            completed_at: row.try_get(14)?,
            expires_at: row.try_get(15)?,
            created_at: row.try_get(16)?,
            updated_at: row.try_get(17)?,
            version: row.try_get(18)?,
            created_position: row.try_get(19)?,
            uploader_uuid: row.try_get(20)?,
        })
    }
}

/// Online projection of one archive event.
pub(super) async fn apply(
    client: &impl GenericClient,
    recorded: &RecordedEvent,
    event: &ArchiveEvent,
) -> Result<(), ProjectionError> {
    let select =
        client.prepare_cached(&format!("SELECT {} FROM archives WHERE archive_uuid = $1", ArchiveRow::COLUMNS)).await?;
    let current = match client.query_opt(&select, &[&archive_uuid(event)]).await? {
        Some(row) => Some(ArchiveRow::from_row(&row)?),
        None => None,
    };
    let Some(row) = ArchiveRow::apply(current, recorded, event) else { return Ok(()) };
    let upsert = client
        .prepare_cached(&format!(
            "INSERT INTO archives ({}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                 $17, $18, $19, $20, $21)
             ON CONFLICT (archive_uuid) DO UPDATE SET status = $6, size = $8, sha256 = $9, entries = $10,
                 skipped_assets = $11, blob_backend = $12, blob_key = $13, error = $14, completed_at = $15,
                 expires_at = $16, updated_at = $18, version = $19, uploader_uuid = $21",
            ArchiveRow::COLUMNS
        ))
        .await?;
    client.execute(&upsert, &row.values()).await?;
    Ok(())
}

pub(super) fn archive_uuid(event: &ArchiveEvent) -> uuid::Uuid {
    match event {
        ArchiveEvent::ArchiveRequested(e) => e.archive_uuid,
        ArchiveEvent::ArchiveStarted(e) => e.archive_uuid,
        ArchiveEvent::ArchiveCompleted(e) => e.archive_uuid,
        ArchiveEvent::ArchiveFailed(e) => e.archive_uuid,
        ArchiveEvent::ArchiveExpired(e) => e.archive_uuid,
        ArchiveEvent::ArchiveDeleted(e) => e.archive_uuid,
    }
}

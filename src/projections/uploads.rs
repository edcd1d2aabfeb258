//! The `uploads` read model (two-phase uploads). Like `jobs`: one pure fold
//! ([`UploadRow::apply`]) serves the online projection (read the row, fold, write back)
//! and the replay (folded in memory), so the two cannot drift apart.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::types::{ToSql, Type};

use super::jobs::signed;
use super::ProjectionError;
use crate::domain::upload::{UploadEvent, UploadStatus};
use crate::eventstore::RecordedEvent;

/// An `uploads` row (columns in table order).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct UploadRow {
    pub upload_uuid: uuid::Uuid,
    id_session: i64,
    filename: String,
    mime_type: Option<String>,
    expected_size: Option<i64>,
    expected_sha256: Option<String>,
    status: String,
    size: Option<i64>,
    sha256: Option<String>,
    content_type: Option<String>,
    blob_backend: Option<String>,
    blob_key: Option<String>,
    asset_uuid: Option<uuid::Uuid>,
    job_uuid: Option<uuid::Uuid>,
    error: Option<String>,
    creator_kind: String,
    creator_uuid: uuid::Uuid,
    requested_by_kind: String,
    requested_by_uuid: uuid::Uuid,
    expires_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    version: i64,
    created_position: i64,
}

impl UploadRow {
    /// The row after `event` (`None` before the upload's first event).
    pub fn apply(row: Option<Self>, recorded: &RecordedEvent, event: &UploadEvent) -> Option<Self> {
        let mut row = match (row, event) {
            (_, UploadEvent::UploadStarted(s)) => UploadRow {
                upload_uuid: s.upload_uuid,
                id_session: s.id_session.get(),
                filename: s.filename.as_str().to_owned(),
                mime_type: s.mime_type.as_ref().map(|m| m.as_str().to_owned()),
                expected_size: s.size.map(signed),
                expected_sha256: s.sha256.as_ref().map(|h| h.as_str().to_owned()),
                status: String::new(),
                size: None,
                sha256: None,
                content_type: None,
                blob_backend: None,
                blob_key: None,
                asset_uuid: None,
                job_uuid: None,
                error: None,
                creator_kind: s.upload_creator.kind.as_str().to_owned(),
                creator_uuid: s.upload_creator.uuid,
                requested_by_kind: s.requested_by.kind.as_str().to_owned(),
                requested_by_uuid: s.requested_by.uuid,
                expires_at: s.expires_at,
                created_at: recorded.recorded_at,
                updated_at: recorded.recorded_at,
                version: recorded.version,
                created_position: recorded.position,
            },
            (None, _) => return None,
            (Some(mut row), event) => {
                match event {
                    UploadEvent::UploadStarted(_) => unreachable!("matched above"),
                    UploadEvent::UploadReceived(r) => {
                        row.size = Some(signed(r.size));
                        row.sha256 = Some(r.sha256.as_str().to_owned());
                        row.content_type = r.content_type.as_ref().map(|m| m.as_str().to_owned());
                        row.blob_backend = Some(r.blob.backend.as_str().to_owned());
                        row.blob_key = Some(r.blob.key.clone());
                    }
                    UploadEvent::UploadImportQueued(q) => {
                        row.job_uuid = Some(q.job_uuid);
                        row.error = None;
                    }
                    UploadEvent::UploadImportCancelled(_) => {}
                    UploadEvent::UploadCommitted(c) => {
                        row.asset_uuid = Some(c.asset_uuid);
                        if c.job_uuid.is_some() {
                            row.job_uuid = c.job_uuid;
                        }
                    }
                    UploadEvent::UploadFailed(f) => row.error = Some(f.error.clone()),
                    UploadEvent::UploadExpired(_) => {}
                }
                row
            }
        };
        row.status = status_after(event).as_str().to_owned();
        row.updated_at = recorded.recorded_at;
        row.version = recorded.version;
        Some(row)
    }

    pub const COLUMNS: &'static str = "upload_uuid, id_session, filename, mime_type, expected_size, expected_sha256, \
        status, size, sha256, content_type, blob_backend, blob_key, asset_uuid, job_uuid, error, creator_kind, \
        creator_uuid, requested_by_kind, requested_by_uuid, expires_at, created_at, updated_at, version, created_position";
    pub const TYPES: [Type; 24] = [
        Type::UUID,
        Type::INT8,
        Type::TEXT,
        Type::TEXT,
        Type::INT8,
        Type::TEXT,
        Type::TEXT,
        Type::INT8,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::UUID,
        Type::UUID,
        Type::TEXT,
        Type::TEXT,
        Type::UUID,
        Type::TEXT,
        Type::UUID,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::INT8,
        Type::INT8,
    ];

    pub fn values(&self) -> [&(dyn ToSql + Sync); 24] {
        [
            &self.upload_uuid,
            &self.id_session,
            &self.filename,
            &self.mime_type,
            &self.expected_size,
            &self.expected_sha256,
            &self.status,
            &self.size,
            &self.sha256,
            &self.content_type,
            &self.blob_backend,
            &self.blob_key,
            &self.asset_uuid,
            &self.job_uuid,
            &self.error,
            &self.creator_kind,
            &self.creator_uuid,
            &self.requested_by_kind,
            &self.requested_by_uuid,
            &self.expires_at,
            &self.created_at,
            &self.updated_at,
            &self.version,
            &self.created_position,
        ]
    }

    fn from_row(row: &tokio_postgres::Row) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            upload_uuid: row.try_get(0)?,
            id_session: row.try_get(1)?,
            filename: row.try_get(2)?,
            mime_type: row.try_get(3)?,
            expected_size: row.try_get(4)?,
            expected_sha256: row.try_get(5)?,
            status: row.try_get(6)?,
            size: row.try_get(7)?,
            sha256: row.try_get(8)?,
            content_type: row.try_get(9)?,
            blob_backend: row.try_get(10)?,
            blob_key: row.try_get(11)?,
            asset_uuid: row.try_get(12)?,
            job_uuid: row.try_get(13)?,
            error: row.try_get(14)?,
            creator_kind: row.try_get(15)?,
            creator_uuid: row.try_get(16)?,
            requested_by_kind: row.try_get(17)?,
            requested_by_uuid: row.try_get(18)?,
            expires_at: row.try_get(19)?,
            created_at: row.try_get(20)?,
            updated_at: row.try_get(21)?,
            version: row.try_get(22)?,
            created_position: row.try_get(23)?,
        })
    }
}

/// The status an event leaves an upload in (the aggregate's own fold decides it).
fn status_after(event: &UploadEvent) -> UploadStatus {
    let mut upload = crate::domain::upload::Upload::default();
    upload.apply(event);
    upload.status
}

/// Online projection of one upload event.
pub(super) async fn apply(
    client: &impl GenericClient,
    recorded: &RecordedEvent,
    event: &UploadEvent,
) -> Result<(), ProjectionError> {
    let select =
        client.prepare_cached(&format!("SELECT {} FROM uploads WHERE upload_uuid = $1", UploadRow::COLUMNS)).await?;
    let current = match client.query_opt(&select, &[&upload_uuid(event)]).await? {
        Some(row) => Some(UploadRow::from_row(&row)?),
        None => None,
    };
    let Some(row) = UploadRow::apply(current, recorded, event) else { return Ok(()) };
    let upsert = client
        .prepare_cached(&format!(
            "INSERT INTO uploads ({}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                 $17, $18, $19, $20, $21, $22, $23, $24)
             ON CONFLICT (upload_uuid) DO UPDATE SET status = $7, size = $8, sha256 = $9, content_type = $10,
                 blob_backend = $11, blob_key = $12, asset_uuid = $13, job_uuid = $14, error = $15,
                 updated_at = $22, version = $23",
            UploadRow::COLUMNS
        ))
        .await?;
    client.execute(&upsert, &row.values()).await?;
    Ok(())
}

pub(super) fn upload_uuid(event: &UploadEvent) -> uuid::Uuid {
    match event {
        UploadEvent::UploadStarted(e) => e.upload_uuid,
        UploadEvent::UploadReceived(e) => e.upload_uuid,
        UploadEvent::UploadImportQueued(e) => e.upload_uuid,
        UploadEvent::UploadImportCancelled(e) => e.upload_uuid,
        UploadEvent::UploadCommitted(e) => e.upload_uuid,
        UploadEvent::UploadFailed(e) => e.upload_uuid,
        UploadEvent::UploadExpired(e) => e.upload_uuid,
    }
}

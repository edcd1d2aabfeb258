//! Queries over the read models, returning the shapes the API shows.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::blob::{BackendKind, BlobLocation};

use crate::domain::names::SessionId;
use crate::domain::principal::{Actor, PrincipalKind};
use crate::domain::session::SessionDetails;

/// A registered session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
pub struct SessionInfo {
    pub id_session: i64,
    pub session_uuid: Uuid,
    pub session_name: String,
    pub id_creator_uuid: Option<Uuid>,
    pub session_users: Vec<Uuid>,
    pub session_participants: Vec<Uuid>,
    pub session_devices: Vec<Uuid>,
    pub session_created_at: DateTime<Utc>,
    pub session_updated_at: DateTime<Utc>,
    /// The session stream's version.
    pub session_version: i64,
    /// The global position of the registration this row stands for: a session deleted
    /// and registered again is a new session, and only assets created after this
    /// position are its own (see [`SessionInfo::owns`]).
    #[serde(skip)]
    #[schemars(skip)]
    pub registered_position: i64,
}

impl SessionInfo {
    /// Whether `asset` was created in this registration of the session, not in an
    /// earlier one that was deleted (whose assets stay closed to the new members).
    pub fn owns(&self, asset: &AssetInfo) -> bool {
        asset.id_session == self.id_session && asset.created_position > self.registered_position
    }

    pub fn details(&self) -> Option<SessionDetails> {
        Some(SessionDetails {
            id_session: SessionId::new(self.id_session).ok()?,
            session_uuid: self.session_uuid,
            session_name: self.session_name.clone(),
            id_creator_uuid: self.id_creator_uuid,
            session_users: self.session_users.clone(),
            session_participants: self.session_participants.clone(),
            session_devices: self.session_devices.clone(),
        })
    }
}

/// An asset's information (OpenTera's fields plus ours).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AssetInfo {
    pub asset_uuid: Uuid,
    pub id_session: i64,
    pub asset_name: String,
    pub asset_original_filename: String,
    pub asset_type: String,
    pub asset_file_size: i64,
    /// SHA-256 of the bytes, 64 hex digits.
    pub asset_sha256: String,
    pub asset_datetime: DateTime<Utc>,
    pub directory: String,
    pub tags: Vec<String>,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// `available` or `deleted`.
    pub asset_status: String,
    pub asset_created_at: DateTime<Utc>,
    pub asset_creator: Actor,
    /// `upload`, `import` or `signed_upload`.
    pub asset_source: String,
    /// The asset stream's version.
    pub asset_version: i64,
    /// The global position of the event that created the asset.
    #[serde(skip)]
    pub created_position: i64,
    /// Where the bytes are (internal: never in answers).
    #[serde(skip)]
    pub blob: Option<BlobLocation>,
    /// TeraServer's `id_asset` (OpenTera mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_asset: Option<i64>,
}

impl AssetInfo {
    pub fn is_available(&self) -> bool {
        self.asset_status == "available"
    }

    /// Where the asset's bytes are: as recorded, else (recorded before backends were)
    /// on the local backend at the uuid's key.
    pub fn blob_location(&self) -> BlobLocation {
        self.blob.clone().unwrap_or_else(|| BlobLocation::new(BackendKind::Local, self.asset_uuid))
    }
}

const SESSION_COLUMNS: &str = "id_session, session_uuid, session_name, id_creator_uuid, session_users, \
    session_participants, session_devices, created_at, updated_at, version, registered_position";

fn session_from_row(row: &tokio_postgres::Row) -> Result<SessionInfo, tokio_postgres::Error> {
    Ok(SessionInfo {
        id_session: row.try_get(0)?,
        session_uuid: row.try_get(1)?,
        session_name: row.try_get(2)?,
        id_creator_uuid: row.try_get(3)?,
        session_users: row.try_get(4)?,
        session_participants: row.try_get(5)?,
        session_devices: row.try_get(6)?,
        session_created_at: row.try_get(7)?,
        session_updated_at: row.try_get(8)?,
        session_version: row.try_get(9)?,
        registered_position: row.try_get(10)?,
    })
}

const ASSET_COLUMNS: &str = "asset_uuid, id_session, asset_name, asset_original_filename, asset_type, asset_file_size, \
    asset_sha256, asset_datetime, directory, tags, metadata, asset_status, asset_created_at, creator_kind, creator_uuid, \
    asset_source, asset_version, created_position, blob_backend, blob_key, opentera_id_asset";

fn asset_from_row(row: &tokio_postgres::Row) -> Result<AssetInfo, tokio_postgres::Error> {
    let tags: serde_json::Value = row.try_get(9)?;
    let metadata: serde_json::Value = row.try_get(10)?;
    let creator_kind: &str = row.try_get(13)?;
    Ok(AssetInfo {
        asset_uuid: row.try_get(0)?,
        id_session: row.try_get(1)?,
        asset_name: row.try_get(2)?,
        asset_original_filename: row.try_get(3)?,
        asset_type: row.try_get(4)?,
        asset_file_size: row.try_get(5)?,
        asset_sha256: row.try_get(6)?,
        asset_datetime: row.try_get(7)?,
        directory: row.try_get(8)?,
        tags: serde_json::from_value(tags).unwrap_or_default(),
        metadata: match metadata {
            serde_json::Value::Object(map) => map,
            _ => Default::default(),
        },
        asset_status: row.try_get(11)?,
        asset_created_at: row.try_get(12)?,
        asset_creator: Actor {
            kind: PrincipalKind::parse(creator_kind).unwrap_or(PrincipalKind::Service),
            uuid: row.try_get(14)?,
        },
        asset_source: row.try_get(15)?,
        asset_version: row.try_get(16)?,
        created_position: row.try_get(17)?,
        blob: match (
            row.try_get::<_, Option<&str>>(18)?.and_then(BackendKind::parse),
            row.try_get::<_, Option<String>>(19)?,
        ) {
            (Some(backend), Some(key)) => Some(BlobLocation { backend, key }),
            _ => None,
        },
        id_asset: row.try_get(20)?,
    })
}

pub async fn session(client: &impl GenericClient, id: SessionId) -> Result<Option<SessionInfo>, tokio_postgres::Error> {
    let statement =
        client.prepare_cached(&format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id_session = $1")).await?;
    client.query_opt(&statement, &[&id.get()]).await?.as_ref().map(session_from_row).transpose()
}

pub async fn asset(client: &impl GenericClient, uuid: Uuid) -> Result<Option<AssetInfo>, tokio_postgres::Error> {
    let statement = client.prepare_cached(&format!("SELECT {ASSET_COLUMNS} FROM assets WHERE asset_uuid = $1")).await?;
    client.query_opt(&statement, &[&uuid]).await?.as_ref().map(asset_from_row).transpose()
}

pub async fn assets(client: &impl GenericClient, uuids: &[Uuid]) -> Result<Vec<AssetInfo>, tokio_postgres::Error> {
    let statement =
        client.prepare_cached(&format!("SELECT {ASSET_COLUMNS} FROM assets WHERE asset_uuid = ANY($1)")).await?;
    client.query(&statement, &[&uuids]).await?.iter().map(asset_from_row).collect()
}

/// Where a listing page starts: after this (created_at, uuid) in newest-first order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListingCursor {
    pub created_at: DateTime<Utc>,
    pub asset_uuid: Uuid,
}

impl ListingCursor {
    pub fn encode(&self) -> String {
        format!("{}_{}", self.created_at.timestamp_micros(), self.asset_uuid.simple())
    }
    /// Reads exactly what [`encode`](Self::encode) writes, `-?[0-9]{1,18}_<32 hex digits>`
    /// (the pattern the OpenAPI document gives). A time past the years assets can have
    /// (1 to 9999) is taken as their first or last microsecond: the page is the same.
    pub fn decode(value: &str) -> Option<Self> {
        let (micros, uuid) = value.split_once('_')?;
        let digits = micros.strip_prefix('-').unwrap_or(micros);
        let hex = |s: &str| s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !(1..=18).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) || !hex(uuid) {
            return None;
        }
        let micros = micros.parse::<i64>().ok()?.clamp(Self::FIRST_MICROS, Self::LAST_MICROS);
        Some(Self { created_at: DateTime::from_timestamp_micros(micros)?, asset_uuid: Uuid::try_parse(uuid).ok()? })
    }

    /// 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999999Z.
    const FIRST_MICROS: i64 = -62_135_596_800_000_000;
    const LAST_MICROS: i64 = 253_402_300_799_999_999;
}

/// Live assets of a session's registration after `registered_position` (not those of an
/// earlier registration of the id, deleted and not yet purged), newest first, at most
/// `limit`, after `cursor`, optionally only those directly in `directory`.
pub async fn session_assets(
    client: &impl GenericClient,
    id: SessionId,
    registered_position: i64,
    directory: Option<&str>,
    cursor: Option<ListingCursor>,
    limit: i64,
) -> Result<Vec<AssetInfo>, tokio_postgres::Error> {
    let statement = client
        .prepare_cached(&format!(
            "SELECT {ASSET_COLUMNS} FROM assets
             WHERE id_session = $1 AND asset_status = 'available'
               AND ($2::text IS NULL OR directory = $2)
               AND ($3::timestamptz IS NULL OR (asset_created_at, asset_uuid) < ($3, $4))
               AND created_position > $6
             ORDER BY asset_created_at DESC, asset_uuid DESC
             LIMIT $5"
        ))
        .await?;
    let created_at = cursor.map(|c| c.created_at);
    let after_uuid = cursor.map_or(Uuid::nil(), |c| c.asset_uuid);
    client
        .query(&statement, &[&id.get(), &directory, &created_at, &after_uuid, &limit, &registered_position])
        .await?
        .iter()
        .map(asset_from_row)
        .collect()
}

/// Up to `limit` live assets of a session created before `before_position` (those of
/// the registrations deleted by then), with their bytes' location: the next batch a
/// purge deletes.
pub async fn live_assets_before(
    client: &impl GenericClient,
    id: SessionId,
    before_position: i64,
    limit: i64,
) -> Result<Vec<(Uuid, BlobLocation)>, tokio_postgres::Error> {
    let statement = client
        .prepare_cached(
            "SELECT asset_uuid, blob_backend, blob_key FROM assets \
             WHERE id_session = $1 AND asset_status = 'available' AND created_position < $2 \
             ORDER BY asset_uuid LIMIT $3",
        )
        .await?;
    let rows = client.query(&statement, &[&id.get(), &before_position, &limit]).await?;
    rows.iter()
        .map(|row| {
            let uuid: Uuid = row.try_get(0)?;
            let backend = row.try_get::<_, Option<&str>>(1)?.and_then(BackendKind::parse);
            let location = match (backend, row.try_get::<_, Option<String>>(2)?) {
                (Some(backend), Some(key)) => BlobLocation { backend, key },
                _ => BlobLocation::new(BackendKind::Local, uuid),
            };
            Ok((uuid, location))
        })
        .collect()
}

/// The sessions that are registered among `ids`, holding a share lock on their rows
/// until the transaction ends, so a concurrent deletion or update waits for (and then
/// sees) what this transaction adds to them. Locked in id order, so two callers never
/// wait on each other crosswise. With `skip_locked`, sessions another transaction is
/// changing are left out instead of waited for.
pub async fn lock_sessions(
    client: &impl GenericClient,
    ids: &[SessionId],
    skip_locked: bool,
) -> Result<Vec<SessionInfo>, tokio_postgres::Error> {
    let ids: Vec<i64> = ids.iter().map(|id| id.get()).collect();
    let skip = if skip_locked { " SKIP LOCKED" } else { "" };
    let statement = client
        .prepare_cached(&format!(
            "SELECT {SESSION_COLUMNS} FROM sessions WHERE id_session = ANY($1) ORDER BY id_session FOR SHARE{skip}"
        ))
        .await?;
    client.query(&statement, &[&ids]).await?.iter().map(session_from_row).collect()
}

/// A job as the `jobs` table holds it (`GET /jobs/{job_uuid}` adds the links).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct JobInfo {
    pub job_uuid: Uuid,
    #[schema(value_type = String, example = "import")]
    pub kind: String,
    /// `queued` (also while waiting to be retried: see `next_attempt_at`), `running`,
    /// `succeeded`, `failed` or `cancelled`.
    #[schema(value_type = String, example = "running")]
    pub status: &'static str,
    /// Attempts started so far.
    pub attempts: i32,
    pub max_attempts: i32,
    pub progress: JobProgress,
    /// What the job made; null until it succeeds. An import's: `asset_uuid`,
    /// `asset_file_size`, `asset_sha256`, and in answers `asset_url` and an
    /// `access_token` for the reader.
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
    /// The last attempt's error (a job being retried keeps it until it succeeds).
    pub error: Option<String>,
    /// The session it works on; null for a job on the whole deployment.
    pub id_session: Option<i64>,
    /// An import's source, without credentials or query secrets.
    pub source_url: Option<String>,
    /// When a job waiting to be retried runs next.
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(skip)]
    pub created_position: i64,
    #[serde(skip)]
    pub requested_by: Uuid,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct JobProgress {
    /// Bytes done.
    pub done: i64,
    /// Bytes in all, once known.
    pub total: Option<i64>,
}

const JOB_COLUMNS: &str = "job_uuid, kind, status, attempts, max_attempts, progress_done, progress_total, result, \
    error, id_session, source_url, next_attempt_at, created_at, updated_at, created_position, requested_by_uuid";

fn job_from_row(row: &tokio_postgres::Row) -> Result<JobInfo, tokio_postgres::Error> {
    let status: String = row.try_get(2)?;
    Ok(JobInfo {
        job_uuid: row.try_get(0)?,
        kind: row.try_get(1)?,
        // Waiting for a retry is still queued, as clients see it.
        status: match status.as_str() {
            "running" => "running",
            "succeeded" => "succeeded",
            "failed" => "failed",
            "cancelled" => "cancelled",
            _ => "queued",
        },
        attempts: row.try_get(3)?,
        max_attempts: row.try_get(4)?,
        progress: JobProgress { done: row.try_get(5)?, total: row.try_get(6)? },
        result: row.try_get(7)?,
        error: row.try_get(8)?,
        id_session: row.try_get(9)?,
        source_url: row.try_get(10)?,
        next_attempt_at: row.try_get(11)?,
        created_at: row.try_get(12)?,
        updated_at: row.try_get(13)?,
        created_position: row.try_get(14)?,
        requested_by: row.try_get(15)?,
    })
}

pub async fn job(client: &impl GenericClient, uuid: Uuid) -> Result<Option<JobInfo>, tokio_postgres::Error> {
    let statement = client.prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE job_uuid = $1")).await?;
    client.query_opt(&statement, &[&uuid]).await?.as_ref().map(job_from_row).transpose()
}

/// A session's jobs created after `after_position` (its registration), newest first,
/// before the `before` position when paging.
pub async fn session_jobs(
    client: &impl GenericClient,
    id_session: SessionId,
    after_position: i64,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<JobInfo>, tokio_postgres::Error> {
    let statement = client
        .prepare_cached(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs
             WHERE id_session = $1 AND created_position > $2 AND ($3::bigint IS NULL OR created_position < $3)
             ORDER BY created_position DESC LIMIT $4"
        ))
        .await?;
    client
        .query(&statement, &[&id_session.get(), &after_position, &before, &limit])
        .await?
        .iter()
        .map(job_from_row)
        .collect()
}

/// Running jobs whose worker's lease ended before `now`.
pub async fn jobs_with_expired_leases(
    client: &impl GenericClient,
    now: DateTime<Utc>,
) -> Result<Vec<Uuid>, tokio_postgres::Error> {
    let statement = client
        .prepare_cached("SELECT job_uuid FROM jobs WHERE status = 'running' AND lease_until < $1 LIMIT 100")
        .await?;
    Ok(client.query(&statement, &[&now]).await?.iter().map(|row| row.get(0)).collect())
}

/// A session's jobs that have not finished (cancelled with it).
pub async fn unfinished_session_jobs(
    client: &impl GenericClient,
    id_session: SessionId,
) -> Result<Vec<Uuid>, tokio_postgres::Error> {
    let statement = client
        .prepare_cached(
            "SELECT job_uuid FROM jobs WHERE id_session = $1 AND status IN ('queued', 'running', 'retry_scheduled')",
        )
        .await?;
    Ok(client.query(&statement, &[&id_session.get()]).await?.iter().map(|row| row.get(0)).collect())
}

/// A two-phase upload as the `uploads` table holds it (`GET /uploads/{upload_uuid}`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct UploadInfo {
    pub upload_uuid: Uuid,
    pub id_session: i64,
    pub filename: String,
    /// The type declared when it was asked for.
    pub mime_type: Option<String>,
    /// The size and SHA-256 declared when it was asked for (the bytes must match).
    pub expected_size: Option<i64>,
    pub expected_sha256: Option<String>,
    /// `pending` (no bytes yet), `received`, `importing`, `committed`, `failed` or
    /// `expired` (also a pending or received upload whose time is over).
    #[schema(value_type = String, example = "received")]
    pub status: String,
    /// Of the bytes received; null until then.
    pub size: Option<i64>,
    pub sha256: Option<String>,
    /// Until then, the upload URL works and the upload can be committed or imported.
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The asset it became (the upload's uuid), once committed.
    pub asset_uuid: Option<Uuid>,
    /// The import job that imports (or imported, or failed to import) it.
    pub job_uuid: Option<Uuid>,
    /// Why its import failed.
    pub error: Option<String>,
    #[serde(skip)]
    pub content_type: Option<String>,
    #[serde(skip)]
    pub blob: Option<BlobLocation>,
    #[serde(skip)]
    pub creator: Actor,
    #[serde(skip)]
    pub requested_by: Actor,
    #[serde(skip)]
    pub created_position: i64,
}

const UPLOAD_COLUMNS: &str = "upload_uuid, id_session, filename, mime_type, expected_size, expected_sha256, status, \
    size, sha256, expires_at, created_at, updated_at, asset_uuid, job_uuid, error, content_type, blob_backend, \
    blob_key, creator_kind, creator_uuid, requested_by_kind, requested_by_uuid, created_position";

fn upload_from_row(row: &tokio_postgres::Row) -> Result<UploadInfo, tokio_postgres::Error> {
    let backend: Option<String> = row.try_get(16)?;
    let key: Option<String> = row.try_get(17)?;
    let actor = |kind: usize, uuid: usize| -> Result<Actor, tokio_postgres::Error> {
        let kind: String = row.try_get(kind)?;
        Ok(Actor { kind: PrincipalKind::parse(&kind).unwrap_or(PrincipalKind::Service), uuid: row.try_get(uuid)? })
    };
    Ok(UploadInfo {
        upload_uuid: row.try_get(0)?,
        id_session: row.try_get(1)?,
        filename: row.try_get(2)?,
        mime_type: row.try_get(3)?,
        expected_size: row.try_get(4)?,
        expected_sha256: row.try_get(5)?,
        status: row.try_get(6)?,
        size: row.try_get(7)?,
        sha256: row.try_get(8)?,
        expires_at: row.try_get(9)?,
        created_at: row.try_get(10)?,
        updated_at: row.try_get(11)?,
        asset_uuid: row.try_get(12)?,
        job_uuid: row.try_get(13)?,
        error: row.try_get(14)?,
        content_type: row.try_get(15)?,
        blob: match (backend.as_deref().and_then(BackendKind::parse), key) {
            (Some(backend), Some(key)) => Some(BlobLocation { backend, key }),
            _ => None,
        },
        creator: actor(18, 19)?,
        requested_by: actor(20, 21)?,
        created_position: row.try_get(22)?,
    })
}

pub async fn upload(client: &impl GenericClient, uuid: Uuid) -> Result<Option<UploadInfo>, tokio_postgres::Error> {
    let statement =
        client.prepare_cached(&format!("SELECT {UPLOAD_COLUMNS} FROM uploads WHERE upload_uuid = $1")).await?;
    client.query_opt(&statement, &[&uuid]).await?.as_ref().map(upload_from_row).transpose()
}

/// Pending or received uploads whose time was over before `now`, oldest first.
pub async fn expiring_uploads(
    client: &impl GenericClient,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<Uuid>, tokio_postgres::Error> {
    let statement = client
        .prepare_cached(
            "SELECT upload_uuid FROM uploads WHERE status IN ('pending', 'received') AND expires_at <= $1
             ORDER BY expires_at LIMIT $2",
        )
        .await?;
    Ok(client.query(&statement, &[&now, &limit]).await?.iter().map(|row| row.get(0)).collect())
}

/// A session's uploads still waiting for bytes or a commit (expired with the session).
pub async fn open_session_uploads(
    client: &impl GenericClient,
    id_session: SessionId,
) -> Result<Vec<Uuid>, tokio_postgres::Error> {
    let statement = client
        .prepare_cached("SELECT upload_uuid FROM uploads WHERE id_session = $1 AND status IN ('pending', 'received')")
        .await?;
    Ok(client.query(&statement, &[&id_session.get()]).await?.iter().map(|row| row.get(0)).collect())
}

/// An archive as the `archives` table holds it (`GET /archives/infos`), in the field
/// names of API.md.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ArchiveInfo {
    pub archive_uuid: Uuid,
    /// `pending`, `in_progress`, `completed`, `failed`, `expired` (also a completed
    /// archive whose time is over) or `deleted`.
    #[schema(example = "completed")]
    pub archive_status: String,
    pub archive_original_filename: String,
    /// Of the zip; null until completed.
    pub archive_file_size: Option<i64>,
    pub archive_sha256: Option<String>,
    /// Files in the zip; null until completed.
    pub archive_entries: Option<i64>,
    /// Assets asked for that were deleted before the build read them (left out).
    pub archive_skipped_assets: Vec<Uuid>,
    pub archive_owner_uuid: Uuid,
    /// The session it was asked for (null for a list of assets).
    pub id_session: Option<i64>,
    pub archive_created_at: DateTime<Utc>,
    /// Null until completed.
    pub archive_completed_at: Option<DateTime<Utc>>,
    /// Null until completed.
    pub archive_expires_at: Option<DateTime<Utc>>,
    /// Why it failed.
    pub archive_error: Option<String>,
    pub job_uuid: Uuid,
    #[serde(skip)]
    pub owner: Actor,
    #[serde(skip)]
    pub blob: Option<BlobLocation>,
    /// Who uploaded it (an archive built outside assetd, OpenTera mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_uploader_uuid: Option<Uuid>,
    /// FTS's integer id of the archive (OpenTera mode): its first event's position.
    #[serde(skip)]
    pub created_position: i64,
}

impl ArchiveInfo {
    /// The status at `now`: a completed archive whose time is over is `expired` before
    /// the cleanup gets to it.
    pub fn status_at(&self, now: DateTime<Utc>) -> &str {
        match self.archive_expires_at {
            Some(at) if self.archive_status == "completed" && at <= now => "expired",
            _ => &self.archive_status,
        }
    }
}

const ARCHIVE_COLUMNS: &str = "archive_uuid, status, filename, size, sha256, entries, skipped_assets, owner_kind, \
    owner_uuid, id_session, created_at, expires_at, error, job_uuid, blob_backend, blob_key, completed_at, \
    uploader_uuid, created_position";

fn archive_from_row(row: &tokio_postgres::Row) -> Result<ArchiveInfo, tokio_postgres::Error> {
    let owner_kind: &str = row.try_get(7)?;
    let owner =
        Actor { kind: PrincipalKind::parse(owner_kind).unwrap_or(PrincipalKind::Service), uuid: row.try_get(8)? };
    Ok(ArchiveInfo {
        archive_uuid: row.try_get(0)?,
        archive_status: row.try_get(1)?,
        archive_original_filename: row.try_get(2)?,
        archive_file_size: row.try_get(3)?,
        archive_sha256: row.try_get(4)?,
        archive_entries: row.try_get(5)?,
        archive_skipped_assets: row.try_get(6)?,
        archive_owner_uuid: owner.uuid,
        id_session: row.try_get(9)?,
        archive_created_at: row.try_get(10)?,
        archive_completed_at: row.try_get(16)?,
        archive_expires_at: row.try_get(11)?,
        archive_error: row.try_get(12)?,
        job_uuid: row.try_get(13)?,
        owner,
        blob: match (
            row.try_get::<_, Option<&str>>(14)?.and_then(BackendKind::parse),
            row.try_get::<_, Option<String>>(15)?,
        ) {
            (Some(backend), Some(key)) => Some(BlobLocation { backend, key }),
            _ => None,
        },
        archive_uploader_uuid: row.try_get(17)?,
        created_position: row.try_get(18)?,
    })
}

/// The archive whose FTS id (`id_archive_file_data`) is `id` (OpenTera mode).
pub async fn archive_by_position(
    client: &impl GenericClient,
    id: i64,
) -> Result<Option<ArchiveInfo>, tokio_postgres::Error> {
    let statement =
        client.prepare_cached(&format!("SELECT {ARCHIVE_COLUMNS} FROM archives WHERE created_position = $1")).await?;
    client.query_opt(&statement, &[&id]).await?.as_ref().map(archive_from_row).transpose()
}

pub async fn archive(client: &impl GenericClient, uuid: Uuid) -> Result<Option<ArchiveInfo>, tokio_postgres::Error> {
    let statement =
        client.prepare_cached(&format!("SELECT {ARCHIVE_COLUMNS} FROM archives WHERE archive_uuid = $1")).await?;
    client.query_opt(&statement, &[&uuid]).await?.as_ref().map(archive_from_row).transpose()
}

/// Completed archives whose time was over before `now`, oldest first.
pub async fn expiring_archives(
    client: &impl GenericClient,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<Uuid>, tokio_postgres::Error> {
    let statement = client
        .prepare_cached(
            "SELECT archive_uuid FROM archives WHERE status = 'completed' AND expires_at <= $1
             ORDER BY expires_at LIMIT $2",
        )
        .await?;
    Ok(client.query(&statement, &[&now, &limit]).await?.iter().map(|row| row.get(0)).collect())
}

/// The live assets of a session's registration after `registered_position`, oldest
/// first (what an archive of the session holds).
pub async fn archive_session_assets(
    client: &impl GenericClient,
    id: SessionId,
    registered_position: i64,
) -> Result<Vec<AssetInfo>, tokio_postgres::Error> {
    let statement = client
        .prepare_cached(&format!(
            "SELECT {ASSET_COLUMNS} FROM assets
             WHERE id_session = $1 AND asset_status = 'available' AND created_position > $2
             ORDER BY asset_created_at, asset_uuid"
        ))
        .await?;
    client.query(&statement, &[&id.get(), &registered_position]).await?.iter().map(asset_from_row).collect()
}

/// Of `keys`, those nothing visible refers to: no live asset, no archive being built or
/// kept, no upload holding bytes. One statement: one snapshot, in which a blob passed
/// from an upload to its asset (a commit) is always referred to by one of them.
pub async fn unreferenced_blob_keys(
    client: &impl GenericClient,
    keys: &[String],
) -> Result<Vec<String>, tokio_postgres::Error> {
    let statement = client
        .prepare_cached(
            "SELECT k FROM unnest($1::text[]) AS k
             WHERE NOT EXISTS (SELECT 1 FROM assets a WHERE a.blob_key = k AND a.asset_status = 'available')
               -- Assets recorded before blob locations were: at their uuid's key.
               AND NOT EXISTS (SELECT 1 FROM assets a WHERE a.blob_key IS NULL AND a.asset_status = 'available'
                               AND a.asset_uuid = split_part(k, '/', 3)::uuid)
               AND NOT EXISTS (SELECT 1 FROM uploads u WHERE u.blob_key = k
                               AND u.status IN ('pending', 'received', 'importing'))
               AND NOT EXISTS (SELECT 1 FROM archives r WHERE r.blob_key = k
                               AND r.status IN ('pending', 'in_progress', 'completed'))
               -- Bytes an archive job is writing under its id: its job is not over. (Those of
               -- unfinished imports are left out by the caller: their ids derive from the job.)
               AND NOT EXISTS (SELECT 1 FROM archives r WHERE r.archive_uuid = split_part(k, '/', 3)::uuid
                               AND r.status IN ('pending', 'in_progress'))",
        )
        .await?;
    Ok(client.query(&statement, &[&keys]).await?.iter().map(|row| row.get(0)).collect())
}

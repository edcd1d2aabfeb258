//! Archives in the application layer (API.md "Jobs: imports and archives"): ask for a
//! zip of a session's assets or of a list of assets (a job builds it), read it, delete
//! it; and what the archive job records (started, completed, failed) and the cleanup
//! (expired).
//!
//! Who may ask: whoever may upload to the session (for a list: whoever may reach every
//! asset of it). Who may read or delete: its owner (who asked), services and
//! superadmins.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use uuid::Uuid;

use super::jobs::{job_stream, JobPolicy};
use super::{receive_once, stage, App, AppError, CommandContext};
use crate::blobs::BlobLocation;
use crate::domain::archive::{
    download_path, Archive, ArchiveCommand, ArchiveCompleted, ArchiveRequested, MAX_ARCHIVE_ASSETS,
};
use crate::domain::job::{ArchiveResult, Job, JobCommand, JobKind, JobQueued, JobResult, JobStatus};
use crate::domain::names::{InvalidValue, SessionId};
use crate::domain::principal::Principal;
use crate::domain::{Aggregate, DomainError};
use crate::projections::read::{self, ArchiveInfo, AssetInfo};

/// Archives one user, participant or device may have pending or in progress at once
/// (services and superadmins are not limited): one member cannot fill the queue ahead
/// of everyone else.
pub const MAX_UNFINISHED_ARCHIVES: i64 = 5;

pub fn archive_stream(uuid: Uuid) -> String {
    <Archive as Aggregate>::stream(uuid)
}

/// The body of `POST /archives` and of the AMQP command `archive.request`: a session's
/// live assets, or a list of assets.
#[derive(Debug, Clone, schemars::JsonSchema)]
#[schemars(untagged)]
pub enum ArchiveBody {
    Session(ArchiveOfSession),
    Assets(ArchiveOfAssets),
}

/// Every live asset of a session.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ArchiveOfSession {
    #[schema(value_type = crate::http::fields::SessionId)]
    #[serde(deserialize_with = "super::jobs::integral")]
    pub id_session: i64,
}

/// These assets (1 to 10,000, each reachable by the requester; a uuid named twice
/// counts once).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ArchiveOfAssets {
    #[schema(value_type = Vec<crate::http::fields::UuidText>, min_items = 1, max_items = 10000)]
    #[schemars(length(min = 1, max = MAX_ARCHIVE_ASSETS))]
    pub asset_uuids: Vec<Uuid>,
}

impl utoipa::PartialSchema for ArchiveBody {
    /// One of the two bodies, as they are (not wrapped in a variant's name).
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::OneOfBuilder::new()
            .item(utoipa::openapi::Ref::from_schema_name("ArchiveOfSession"))
            .item(utoipa::openapi::Ref::from_schema_name("ArchiveOfAssets"))
            .description(Some("A session's live assets (`id_session`), or a list of assets (`asset_uuids`)"))
            .into()
    }
}

impl utoipa::ToSchema for ArchiveBody {
    fn schemas(schemas: &mut Vec<(String, utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>)>) {
        schemas.push(("ArchiveOfSession".into(), <ArchiveOfSession as utoipa::PartialSchema>::schema()));
        schemas.push(("ArchiveOfAssets".into(), <ArchiveOfAssets as utoipa::PartialSchema>::schema()));
    }
}

impl<'de> Deserialize<'de> for ArchiveBody {
    /// By which field is there, so that each shape's own errors are reported (an
    /// untagged enum would only say that neither matched).
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut value = serde_json::Value::deserialize(deserializer)?;
        // A field sent as null is a field not sent (generated clients write them so).
        if let serde_json::Value::Object(fields) = &mut value {
            for name in ["id_session", "asset_uuids"] {
                if fields.get(name).is_some_and(serde_json::Value::is_null) {
                    fields.remove(name);
                }
            }
        }
        let result = match (value.get("id_session"), value.get("asset_uuids")) {
            (Some(_), None) => serde_json::from_value(value).map(Self::Session),
            (None, Some(_)) => serde_json::from_value(value).map(Self::Assets),
            _ => return Err(serde::de::Error::custom("give exactly one of id_session and asset_uuids")),
        };
        result.map_err(serde::de::Error::custom)
    }
}

/// What an archive is asked for, validated.
#[derive(Debug, Clone)]
pub enum ArchiveScope {
    Session(SessionId),
    Assets(Vec<Uuid>),
}

impl ArchiveBody {
    pub fn validate(self) -> Result<ArchiveScope, InvalidValue> {
        match self {
            Self::Session(body) => Ok(ArchiveScope::Session(SessionId::new(body.id_session)?)),
            Self::Assets(body) => {
                let mut seen = std::collections::HashSet::with_capacity(body.asset_uuids.len());
                let unique: Vec<Uuid> = body.asset_uuids.into_iter().filter(|uuid| seen.insert(*uuid)).collect();
                if unique.is_empty() || unique.len() > MAX_ARCHIVE_ASSETS {
                    return Err(InvalidValue::new("asset_uuids", format!("1 to {MAX_ARCHIVE_ASSETS} asset uuids")));
                }
                Ok(ArchiveScope::Assets(unique))
            }
        }
    }
}

/// A session's folder (and zip) name: `<id_session>_<session_name>`.
pub fn session_folder(id_session: i64, session_name: &str) -> String {
    format!("{id_session}_{session_name}")
}

/// What an archive job will put in the zip: the assets, in order, each with its entry's
/// folder, and the assets asked for that are gone.
pub struct ArchivePlan {
    pub assets: Vec<(AssetInfo, String)>,
    pub skipped: Vec<Uuid>,
}

impl App {
    /// Queues an archive: `ArchiveRequested` and the job's `JobQueued` in one transaction.
    pub async fn request_archive(
        &self,
        principal: &Principal,
        ctx: &CommandContext,
        scope: ArchiveScope,
        policy: JobPolicy,
    ) -> Result<ArchiveInfo, AppError> {
        let (id_session, filename) = match &scope {
            ArchiveScope::Session(id) => {
                let session = self.session_for(principal, *id).await?;
                (Some(*id), format!("{}.zip", session_folder(id.get(), &session.session_name)))
            }
            ArchiveScope::Assets(uuids) => {
                let requested: Vec<(Uuid, Option<String>)> = uuids.iter().map(|uuid| (*uuid, None)).collect();
                let assets = self.assets_for(principal, &requested).await?;
                if let Some(gone) = assets.iter().find(|asset| !asset.is_available()) {
                    return Err(AppError::Domain(DomainError::Invalid(format!(
                        "asset {} is deleted",
                        gone.asset_uuid
                    ))));
                }
                (None, format!("assets_{}.zip", Utc::now().format("%Y%m%d-%H%M%S")))
            }
        };
        let archive_uuid = Uuid::new_v4();
        let job_uuid = Uuid::new_v4();
        let requested = ArchiveRequested {
            archive_uuid,
            job_uuid,
            id_session,
            asset_uuids: match &scope {
                ArchiveScope::Assets(uuids) => Some(uuids.clone()),
                ArchiveScope::Session(_) => None,
            },
            archive_owner: principal.actor(),
            owner_reaches_all: principal.is_privileged(),
            archive_original_filename: crate::domain::names::FileName::parse(&filename)
                .map(|name| name.as_str().to_owned())
                .unwrap_or_else(|_| format!("archive_{archive_uuid}.zip")),
            uploaded: false,
        };
        let queued = JobQueued {
            job_uuid,
            kind: JobKind::Archive,
            id_session,
            requested_by: principal.actor(),
            max_attempts: policy.max_attempts.max(1),
            import: None,
            archive_uuid: Some(archive_uuid),
        };
        in_transaction!(self, |tx| {
            receive_once(&tx, ctx, &archive_stream(archive_uuid)).await?;
            if !principal.is_privileged() {
                // One owner's requests one at a time, so the count below holds.
                let owner_lock = format!("archive-owner-{}-{}", principal.kind.as_str(), principal.uuid);
                crate::eventstore::lock_stream(&tx, &owner_lock).await?;
                let unfinished: i64 = tx
                    .query_one(
                        "SELECT count(*) FROM archives WHERE owner_kind = $1 AND owner_uuid = $2
                         AND status IN ('pending', 'in_progress')",
                        &[&principal.kind.as_str(), &principal.uuid],
                    )
                    .await?
                    .try_get(0)?;
                if unfinished >= MAX_UNFINISHED_ARCHIVES {
                    return Err(AppError::TooMany(
                        "too_many_archives",
                        format!(
                            "{unfinished} of your archives are still being built (at most \
                             {MAX_UNFINISHED_ARCHIVES}); ask again once one is completed"
                        ),
                    ));
                }
            }
            if let Some(id) = id_session {
                super::uploads::lock_session_admitting(&tx, id, None, principal).await?;
            }
            stage::<Archive>(&tx, ctx, &archive_stream(archive_uuid), ArchiveCommand::Request(requested.clone()))
                .await?;
            stage::<Job>(&tx, ctx, &job_stream(job_uuid), JobCommand::Queue(Box::new(queued.clone()))).await?;
            read::archive(&tx, archive_uuid).await?.ok_or(AppError::Domain(DomainError::NotFound("archive")))
        })
    }

    /// The archive, if `principal` may reach it: its owner, services, superadmins.
    pub async fn archive_for(&self, principal: &Principal, uuid: Uuid) -> Result<ArchiveInfo, AppError> {
        let client = self.pool.get().await?;
        let archive = read::archive(&client, uuid).await?.ok_or(DomainError::NotFound("archive"))?;
        if !principal.is_privileged() && archive.owner != principal.actor() {
            return Err(AppError::Forbidden(format!("archive {uuid} belongs to someone else")));
        }
        Ok(archive)
    }

    /// Deletes an archive (its owner, services, superadmins): one being built stops (its
    /// job is cancelled), a built one loses its bytes.
    pub async fn delete_archive(
        &self,
        principal: &Principal,
        ctx: &CommandContext,
        uuid: Uuid,
    ) -> Result<ArchiveInfo, AppError> {
        let archive = self.archive_for(principal, uuid).await?;
        let actor = principal.actor();
        let (info, bytes) = in_transaction!(self, |tx| {
            let (state, events) =
                stage::<Archive>(&tx, ctx, &archive_stream(uuid), ArchiveCommand::Delete(actor)).await?;
            let job = stage::<Job>(&tx, ctx, &job_stream(archive.job_uuid), JobCommand::Cancel(actor)).await;
            match job {
                // An uploaded archive (OpenTera mode) has no job.
                Ok(_) | Err(AppError::Domain(DomainError::Conflict(_) | DomainError::NotFound(_))) => {}
                Err(error) => return Err(error),
            }
            // The bytes it had, as `ArchiveDeleted` says (none unless it was built).
            let bytes = events
                .first()
                .and_then(|event| event.data.get("blob").cloned())
                .and_then(|blob| serde_json::from_value::<BlobLocation>(blob).ok());
            let _ = state;
            let info = read::archive(&tx, uuid).await?.ok_or(AppError::Domain(DomainError::NotFound("archive")))?;
            Ok((info, bytes))
        })?;
        // Also bytes a running attempt may be about to place: it is cancelled, and its
        // completion is refused; what it wrote goes with its temporary file.
        if let Some(location) = bytes {
            self.remove_archive_bytes(&location).await;
        }
        Ok(info)
    }

    // ----- archives built outside assetd and uploaded (OpenTera mode) -----

    /// Records an archive that OpenTera's AssetsArchiveWorker will build and upload for
    /// `owner` (FTS's `POST /api/archives/infos` with id 0). Pending until uploaded.
    pub async fn create_uploaded_archive(
        &self,
        ctx: &CommandContext,
        owner: crate::domain::principal::Actor,
        filename: crate::domain::names::FileName,
    ) -> Result<ArchiveInfo, AppError> {
        let archive_uuid = Uuid::new_v4();
        let requested = ArchiveRequested {
            archive_uuid,
            job_uuid: archive_uuid,
            id_session: None,
            asset_uuids: None,
            archive_owner: owner,
            owner_reaches_all: false,
            archive_original_filename: filename.as_str().to_owned(),
            uploaded: true,
        };
        in_transaction!(self, |tx| {
            stage::<Archive>(&tx, ctx, &archive_stream(archive_uuid), ArchiveCommand::Request(requested.clone()))
                .await?;
            read::archive(&tx, archive_uuid).await?.ok_or(AppError::Domain(DomainError::NotFound("archive")))
        })
    }

    /// FTS's status change of an uploaded archive: 1 (in progress: its worker started),
    /// 3 (cancelled: failed), 4 (deleted). 0 and 2 are not changes one can ask for.
    pub async fn set_uploaded_archive_status(
        &self,
        principal: &Principal,
        ctx: &CommandContext,
        archive: &ArchiveInfo,
        status: i64,
    ) -> Result<ArchiveInfo, AppError> {
        let uuid = archive.archive_uuid;
        let command = match status {
            1 => ArchiveCommand::Start { job_uuid: archive.job_uuid, attempt: 1 },
            3 => ArchiveCommand::Fail { job_uuid: archive.job_uuid, error: "cancelled".into() },
            4 => return self.delete_archive(principal, ctx, uuid).await,
            _ => return Err(DomainError::Invalid(format!("archive_status {status} cannot be set here")).into()),
        };
        in_transaction!(self, |tx| {
            stage::<Archive>(&tx, ctx, &archive_stream(uuid), command.clone()).await?;
            read::archive(&tx, uuid).await?.ok_or(AppError::Domain(DomainError::NotFound("archive")))
        })
    }

    /// The zip of an uploaded archive, received: made durable, then `ArchiveCompleted`
    /// (with its uploader) recorded; the bytes are removed again if that is refused.
    /// It expires `ttl` after it was asked for (FTS: 7 days after creation).
    pub async fn complete_uploaded_archive(
        &self,
        principal: &Principal,
        ctx: &CommandContext,
        archive: &ArchiveInfo,
        blob: crate::blobs::TempBlob,
        ttl: std::time::Duration,
    ) -> Result<ArchiveInfo, AppError> {
        let stored = blob.persist().await?;
        let expires_at = crate::domain::names::storable(
            archive.archive_created_at + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::days(7)),
        )
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
        let uuid = archive.archive_uuid;
        let completed = ArchiveCompleted {
            archive_uuid: uuid,
            job_uuid: archive.job_uuid,
            id_session: None,
            archive_owner: archive.owner,
            archive_original_filename: archive.archive_original_filename.clone(),
            size: stored.size,
            sha256: stored.sha256.clone(),
            entries: 0,
            skipped_assets: vec![],
            blob: stored.location.clone(),
            expires_at,
            download_path: download_path(uuid),
            archive_uploader: Some(principal.actor()),
        };
        let recorded = in_transaction!(self, |tx| {
            stage::<Archive>(&tx, ctx, &archive_stream(uuid), ArchiveCommand::Complete(Box::new(completed.clone())))
                .await?;
            read::archive(&tx, uuid).await?.ok_or(AppError::Domain(DomainError::NotFound("archive")))
        });
        if recorded.is_err() {
            self.remove_archive_bytes(&stored.location).await;
        }
        recorded
    }

    /// The archive whose FTS id is `id` (OpenTera mode).
    pub async fn archive_by_id(&self, id: i64) -> Result<ArchiveInfo, AppError> {
        let client = self.pool.get().await?;
        Ok(read::archive_by_position(&client, id).await?.ok_or(DomainError::NotFound("archive"))?)
    }

    /// What the archive of `archive_uuid` holds now: the live assets of its session (the
    /// registration it was asked in), or those of its list still there (the others are
    /// skipped, and named in `ArchiveCompleted`). Each with its folder in the zip.
    pub async fn archive_plan(&self, archive_uuid: Uuid) -> Result<ArchivePlan, AppError> {
        let client = self.pool.get().await?;
        let history = crate::eventstore::read_stream(&client, &archive_stream(archive_uuid), 0).await?;
        let mut archive = Archive::default();
        for recorded in &history {
            if let Some(event) = <crate::domain::archive::ArchiveEvent as crate::domain::DomainEvent>::from_parts(
                &recorded.event_type,
                &recorded.data,
            ) {
                archive.apply(&event.map_err(|_| AppError::CorruptEvent(recorded.id))?);
            }
        }
        let requested = archive.requested.ok_or(DomainError::NotFound("archive"))?;
        let asked_at = history.first().map_or(0, |first| first.position);
        let (assets, skipped) = match (&requested.id_session, &requested.asset_uuids) {
            (Some(id), _) => {
                let session = read::session(&client, *id).await?;
                // The registration it was asked in: deleted (or registered again) since,
                // it has nothing left to archive.
                match session.filter(|s| s.registered_position < asked_at) {
                    Some(s) => (read::archive_session_assets(&client, *id, s.registered_position).await?, vec![]),
                    None => (vec![], vec![]),
                }
            }
            (None, Some(uuids)) => {
                let found = read::assets(&client, uuids).await?;
                let mut by_uuid: std::collections::HashMap<Uuid, AssetInfo> =
                    found.into_iter().map(|asset| (asset.asset_uuid, asset)).collect();
                let mut assets = Vec::new();
                let mut skipped = Vec::new();
                // The owner must still reach each one now (removed from its session, or
                // the session deleted, since the request: left out).
                let owner = Principal {
                    kind: requested.archive_owner.kind,
                    uuid: requested.archive_owner.uuid,
                    name: String::new(),
                    superadmin: false,
                };
                let mut sessions: std::collections::HashMap<i64, Option<read::SessionInfo>> = Default::default();
                for uuid in uuids {
                    let Some(asset) = by_uuid.remove(uuid).filter(AssetInfo::is_available) else {
                        skipped.push(*uuid);
                        continue;
                    };
                    if !requested.owner_reaches_all {
                        if let std::collections::hash_map::Entry::Vacant(vacant) = sessions.entry(asset.id_session) {
                            let session = match SessionId::new(asset.id_session) {
                                Ok(id) => read::session(&client, id).await?,
                                Err(_) => None,
                            };
                            vacant.insert(session);
                        }
                        let reaches = sessions.get(&asset.id_session).and_then(Option::as_ref).is_some_and(|s| {
                            s.owns(&asset) && s.details().is_some_and(|details| details.grants(&owner))
                        });
                        if !reaches {
                            skipped.push(*uuid);
                            continue;
                        }
                    }
                    assets.push(asset);
                }
                (assets, skipped)
            }
            (None, None) => (vec![], vec![]),
        };
        let mut names = std::collections::HashMap::new();
        let mut planned = Vec::with_capacity(assets.len());
        for asset in assets {
            let folder = match names.get(&asset.id_session) {
                Some(folder) => folder,
                None => {
                    let name = match SessionId::new(asset.id_session) {
                        Ok(id) => read::session(&client, id).await?.map(|s| s.session_name),
                        Err(_) => None,
                    };
                    let folder = match name {
                        Some(name) => session_folder(asset.id_session, &name),
                        None => asset.id_session.to_string(),
                    };
                    names.entry(asset.id_session).or_insert(folder)
                }
            }
            .clone();
            planned.push((asset, folder));
        }
        Ok(ArchivePlan { assets: planned, skipped })
    }

    /// The archive job's zip is complete and sealed: in one transaction, only while
    /// `attempt` is still the job's, the job's success and `ArchiveCompleted` are
    /// recorded and, last, the bytes are placed under the archive's id (replacing what a
    /// crashed attempt may have left there). Refused (conflict) if the archive was
    /// deleted or the job cancelled meanwhile: the sealed bytes are then dropped.
    pub async fn archive_succeeded(
        &self,
        ctx: &CommandContext,
        job_uuid: Uuid,
        attempt: u32,
        built: crate::jobs::archive::ArchiveBuilt,
        ttl: std::time::Duration,
    ) -> Result<(), AppError> {
        let crate::jobs::archive::ArchiveBuilt { archive_uuid, entries, archived_bytes, skipped, sealed } = built;
        let client = self.pool.get().await?;
        let archive = read::archive(&client, archive_uuid).await?.ok_or(DomainError::NotFound("archive"))?;
        drop(client);
        let expires_at = crate::domain::names::storable(
            Utc::now() + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::days(7)),
        )
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
        let completed = ArchiveCompleted {
            archive_uuid,
            job_uuid,
            id_session: archive.id_session.and_then(|id| SessionId::new(id).ok()),
            archive_owner: archive.owner,
            archive_original_filename: archive.archive_original_filename.clone(),
            size: sealed.size,
            sha256: sealed.sha256.clone(),
            entries,
            skipped_assets: skipped,
            blob: sealed.location.clone(),
            expires_at,
            download_path: download_path(archive_uuid),
            archive_uploader: None,
        };
        let result = JobResult::Archive(ArchiveResult {
            archive_uuid,
            archive_file_size: sealed.size,
            archive_sha256: sealed.sha256.clone(),
            entries,
            archived_bytes,
        });
        let mut sealed = Some(sealed);
        in_transaction!(self, |tx| {
            stage::<Job>(&tx, ctx, &job_stream(job_uuid), JobCommand::Succeed { attempt, result: result.clone() })
                .await?;
            let complete = ArchiveCommand::Complete(Box::new(completed.clone()));
            stage::<Archive>(&tx, ctx, &archive_stream(archive_uuid), complete).await?;
            if let Some(sealed) = sealed.take() {
                sealed.place().await?;
            }
            Ok(())
        })
    }

    /// Expires every completed archive whose time is over at `now` (`ArchiveExpired`)
    /// and removes its bytes; each in its own transaction. Returns how many expired.
    pub async fn expire_archives(
        &self,
        ctx: &CommandContext,
        now: DateTime<Utc>,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<u64, AppError> {
        let mut expired = 0;
        loop {
            let due = {
                let client = self.pool.get().await?;
                read::expiring_archives(&client, now, 100).await?
            };
            let mut progressed = false;
            for uuid in due {
                if stop.is_cancelled() {
                    return Ok(expired);
                }
                let bytes = in_transaction!(self, |tx| {
                    let (state, events) =
                        stage::<Archive>(&tx, ctx, &archive_stream(uuid), ArchiveCommand::Expire { now }).await?;
                    Ok(state.completed.filter(|_| !events.is_empty()).map(|completed| completed.blob))
                })?;
                if let Some(location) = bytes {
                    expired += 1;
                    progressed = true;
                    self.remove_archive_bytes(&location).await;
                }
            }
            if !progressed {
                return Ok(expired);
            }
        }
    }

    async fn remove_archive_bytes(&self, location: &BlobLocation) {
        if let Err(error) = self.blobs.remove(location).await {
            let key = &location.key;
            tracing::warn!(key, %error, "could not remove an archive's bytes; the cleanup job will");
        }
    }
}

/// In a job's transaction, after its event: the archive an archive job builds follows
/// the job. An attempt starting (`started`: the job's event was `JobStarted`) marks it
/// in progress; a job failed or cancelled fails it.
pub(super) async fn archive_follows_job(
    tx: &deadpool_postgres::Transaction<'_>,
    ctx: &CommandContext,
    job_uuid: Uuid,
    job: &Job,
    started: bool,
) -> Result<(), AppError> {
    let Some(archive_uuid) = job.queued.as_ref().and_then(|q| q.archive_uuid) else { return Ok(()) };
    let command = match &job.status {
        JobStatus::Running { attempt, .. } if started => ArchiveCommand::Start { job_uuid, attempt: *attempt },
        JobStatus::Failed => ArchiveCommand::Fail {
            job_uuid,
            error: job.last_error.clone().unwrap_or_else(|| "the archive job failed".into()),
        },
        JobStatus::Cancelled => ArchiveCommand::Fail { job_uuid, error: "the archive job was cancelled".into() },
        _ => return Ok(()),
    };
    let is_start = matches!(command, ArchiveCommand::Start { .. });
    match stage::<Archive>(tx, ctx, &archive_stream(archive_uuid), command).await {
        Ok(_) => Ok(()),
        // Deleted meanwhile: its job goes on only to find that out.
        Err(AppError::Domain(DomainError::Conflict(_))) if !is_start => Ok(()),
        Err(error) => Err(error),
    }
}

//! Two-phase uploads in the application layer (API.md "Signed URLs and two-phase
//! uploads"): ask for an upload, receive its bytes (from a signed PUT), commit it as an
//! asset, read its status, and expire the ones never committed. The import of an upload
//! by a job is in [`super::jobs`].

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{stage, stage_unlocked, App, AppError, CommandContext};
use crate::blobs::{BlobLocation, TempBlob};
use crate::domain::asset::{Asset, AssetCommand, AssetCommitted, AssetSource, AssetUploaded};
use crate::domain::names::{AssetName, Directory, FileName, MediaType, SessionId, Sha256Hex, Tags};
use crate::domain::principal::{Actor, Principal};
use crate::domain::upload::{Upload, UploadCommand, UploadReceived, UploadStarted};
use crate::domain::{Aggregate, DomainError};
use crate::projections::read::{self, AssetInfo, UploadInfo};

pub fn upload_stream(uuid: Uuid) -> String {
    <Upload as Aggregate>::stream(uuid)
}

/// A validated request for an upload.
#[derive(Debug, Clone)]
pub struct UploadRequest {
    pub id_session: SessionId,
    pub filename: FileName,
    pub mime_type: Option<MediaType>,
    pub size: Option<u64>,
    pub sha256: Option<Sha256Hex>,
    pub creator: Actor,
}

/// What the asset made of an upload is called and filed under (as a multipart upload's
/// `file_asset` says).
#[derive(Debug, Clone)]
pub struct AssetFields {
    pub asset_name: AssetName,
    pub asset_type: Option<MediaType>,
    pub asset_datetime: Option<DateTime<Utc>>,
    pub directory: Directory,
    pub tags: Tags,
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// The asset a received upload becomes: the upload's uuid, file name and bytes (where
/// they are), named and filed as `fields` say. The type: as asked now, else as declared,
/// else the PUT's Content-Type, else guessed from the file name.
pub fn asset_of_upload(started: &UploadStarted, received: &UploadReceived, fields: &AssetFields) -> AssetUploaded {
    let asset_type = fields
        .asset_type
        .clone()
        .or_else(|| started.mime_type.clone())
        .or_else(|| received.content_type.clone())
        .unwrap_or_else(|| MediaType::guess_from_filename(&started.filename));
    AssetUploaded {
        asset_uuid: started.upload_uuid,
        id_session: started.id_session,
        asset_name: fields.asset_name.clone(),
        asset_original_filename: started.filename.clone(),
        asset_type,
        asset_file_size: received.size,
        asset_sha256: received.sha256.clone(),
        asset_datetime: fields.asset_datetime.or_else(|| crate::domain::names::storable(Utc::now())),
        directory: fields.directory.clone(),
        tags: fields.tags.clone(),
        metadata: fields.metadata.clone(),
        asset_creator: started.upload_creator,
        asset_source: AssetSource::SignedUpload,
        blob: Some(received.blob.clone()),
        id_asset: None,
    }
}

/// Refuses unless the session `id` is registered now, was registered before `created`
/// (the position of what is being continued: an upload) and admits `principal`; under a
/// share lock on its row, so that a deletion waits for the caller's transaction.
pub(super) async fn lock_session_admitting(
    tx: &deadpool_postgres::Transaction<'_>,
    id: SessionId,
    created: Option<i64>,
    principal: &Principal,
) -> Result<(), AppError> {
    tx.execute("SELECT 1 FROM sessions WHERE id_session = $1 FOR SHARE", &[&id.get()]).await?;
    let session = read::session(tx, id).await?.ok_or(DomainError::NotFound("session"))?;
    if created.is_some_and(|created| session.registered_position >= created) {
        // Deleted and registered again since: the upload belonged to the earlier session.
        return Err(DomainError::NotFound("session").into());
    }
    if !session.details().is_some_and(|details| details.grants(principal)) {
        return Err(AppError::Forbidden(format!("no access to session {id}")));
    }
    Ok(())
}

impl App {
    /// Starts a two-phase upload to a session the principal may upload to.
    pub async fn start_upload(
        &self,
        principal: &Principal,
        ctx: &CommandContext,
        request: UploadRequest,
    ) -> Result<UploadInfo, AppError> {
        self.session_for(principal, request.id_session).await?;
        let upload_uuid = Uuid::new_v4();
        let ttl = chrono::Duration::from_std(self.upload_ttl).unwrap_or(chrono::Duration::days(1));
        let expires_at = crate::domain::names::storable(Utc::now() + ttl).unwrap_or_else(Utc::now);
        let started = UploadStarted {
            upload_uuid,
            id_session: request.id_session,
            filename: request.filename,
            mime_type: request.mime_type,
            size: request.size,
            sha256: request.sha256,
            upload_creator: request.creator,
            requested_by: principal.actor(),
            expires_at,
        };
        in_transaction!(self, |tx| {
            lock_session_admitting(&tx, request.id_session, None, principal).await?;
            stage::<Upload>(&tx, ctx, &upload_stream(upload_uuid), UploadCommand::Start(started.clone())).await?;
            read::upload(&tx, upload_uuid).await?.ok_or(AppError::Domain(DomainError::NotFound("upload")))
        })
    }

    /// The upload, if `principal` may see it: who asked for it, the privileged, and the
    /// members of its session (the registration it was made in).
    pub async fn upload_for(&self, principal: &Principal, uuid: Uuid) -> Result<UploadInfo, AppError> {
        let client = self.pool.get().await?;
        let upload = read::upload(&client, uuid).await?.ok_or(DomainError::NotFound("upload"))?;
        if principal.is_privileged() || upload.requested_by == principal.actor() {
            return Ok(upload);
        }
        let session = match SessionId::new(upload.id_session) {
            Ok(id) => read::session(&client, id).await?,
            Err(_) => None,
        };
        let admits = session.is_some_and(|s| {
            upload.created_position > s.registered_position && s.details().is_some_and(|d| d.grants(principal))
        });
        if !admits {
            return Err(AppError::Forbidden(format!("no access to upload {uuid}")));
        }
        Ok(upload)
    }

    /// The upload a signed upload URL names (the URL is the permission).
    pub async fn upload_by_url(&self, uuid: Uuid) -> Result<UploadInfo, AppError> {
        let client = self.pool.get().await?;
        Ok(read::upload(&client, uuid).await?.ok_or(DomainError::NotFound("upload"))?)
    }

    /// Records the bytes of a pending upload, written by `blob` (under a key of its own:
    /// see the signed PUT): they become durable and are checked against what was
    /// declared, then `UploadReceived` names them. If that is refused (a concurrent PUT
    /// was recorded first: conflict), these bytes are removed, and only these.
    pub async fn receive_upload(
        &self,
        ctx: &CommandContext,
        upload: &UploadInfo,
        blob: TempBlob,
        content_type: Option<MediaType>,
    ) -> Result<UploadInfo, AppError> {
        let stored = blob.persist().await?;
        let location = stored.location.clone();
        // Checked before anything is recorded; the size was already held to the
        // declared one while receiving, so this is the last guard.
        let mismatch = if upload.expected_size.is_some_and(|size| i64::try_from(stored.size) != Ok(size)) {
            Some((
                "size_mismatch",
                format!("the body has {} bytes, not the declared {:?}", stored.size, upload.expected_size),
            ))
        } else if upload.expected_sha256.as_deref().is_some_and(|sha256| sha256 != stored.sha256.as_str()) {
            Some((
                "sha256_mismatch",
                format!(
                    "the body's SHA-256 is {}, not the declared {}",
                    stored.sha256.as_str(),
                    upload.expected_sha256.as_deref().unwrap_or_default()
                ),
            ))
        } else {
            None
        };
        if let Some((code, message)) = mismatch {
            self.remove_upload_bytes(&location).await;
            return Err(AppError::Unprocessable(code, message));
        }
        let id_session = SessionId::new(upload.id_session)
            .map_err(|error| AppError::Domain(DomainError::Invalid(error.to_string())))?;
        let received = UploadReceived {
            upload_uuid: upload.upload_uuid,
            id_session,
            size: stored.size,
            sha256: stored.sha256,
            content_type,
            blob: stored.location,
        };
        let recorded = in_transaction!(self, |tx| {
            let command = UploadCommand::Receive { received: received.clone(), now: Utc::now() };
            stage::<Upload>(&tx, ctx, &upload_stream(upload.upload_uuid), command).await?;
            read::upload(&tx, upload.upload_uuid).await?.ok_or(AppError::Domain(DomainError::NotFound("upload")))
        });
        if let Err(error) = &recorded {
            if !matches!(error, AppError::CommitOutcomeUnknown(_)) {
                self.remove_upload_bytes(&location).await;
            }
        }
        recorded
    }

    /// Commits a received upload as an asset (`AssetCommitted`), in one transaction with
    /// `UploadCommitted`; no byte moves. Whoever asked for the upload (or a privileged
    /// principal) commits it, while the session still admits them.
    pub async fn commit_upload(
        &self,
        principal: &Principal,
        ctx: &CommandContext,
        uuid: Uuid,
        fields: AssetFields,
    ) -> Result<AssetInfo, AppError> {
        let upload = self.upload_for(principal, uuid).await?;
        if !principal.is_privileged() && upload.requested_by != principal.actor() {
            return Err(AppError::Forbidden("only who asked for the upload may commit it".into()));
        }
        let id_session = SessionId::new(upload.id_session)
            .map_err(|error| AppError::Domain(DomainError::Invalid(error.to_string())))?;
        in_transaction!(self, |tx| {
            lock_session_admitting(&tx, id_session, Some(upload.created_position), principal).await?;
            let commit = UploadCommand::Commit { now: Utc::now() };
            let (state, _) = stage::<Upload>(&tx, ctx, &upload_stream(uuid), commit).await?;
            let (Some(started), Some(received)) = (&state.started, &state.received) else {
                return Err(AppError::Domain(DomainError::Conflict("the upload has no bytes".into())));
            };
            let committed = AssetCommitted { asset: asset_of_upload(started, received, &fields), upload_uuid: uuid };
            stage_unlocked::<Asset>(&tx, ctx, &super::asset_stream(uuid), AssetCommand::Commit(committed)).await?;
            read::asset(&tx, uuid).await?.ok_or(AppError::Domain(DomainError::NotFound("asset")))
        })
    }

    /// Expires every pending or received upload whose time is over at `now`
    /// (`UploadExpired`), and removes the bytes of those that had them. Returns how
    /// many expired. Each upload is its own transaction: one that is committed or
    /// imported meanwhile is left alone. Stops between two uploads once `stop` is
    /// cancelled (a job cancelled, a worker stopping): what is left, the next run does.
    pub async fn expire_uploads(
        &self,
        ctx: &CommandContext,
        now: DateTime<Utc>,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<u64, AppError> {
        let mut expired = 0;
        loop {
            let due = {
                let client = self.pool.get().await?;
                read::expiring_uploads(&client, now, 100).await?
            };
            if due.is_empty() {
                return Ok(expired);
            }
            let mut progressed = false;
            for uuid in due {
                if stop.is_cancelled() {
                    return Ok(expired);
                }
                let bytes = in_transaction!(self, |tx| {
                    let (state, events) =
                        stage::<Upload>(&tx, ctx, &upload_stream(uuid), UploadCommand::Expire { now }).await?;
                    Ok((!events.is_empty(), state.received.map(|received| received.blob)))
                })?;
                if let (true, bytes) = bytes {
                    expired += 1;
                    progressed = true;
                    if let Some(location) = bytes {
                        self.remove_upload_bytes(&location).await;
                    }
                }
            }
            if !progressed {
                return Ok(expired);
            }
        }
    }

    pub(super) async fn remove_upload_bytes(&self, location: &BlobLocation) {
        if let Err(error) = self.blobs.remove(location).await {
            let key = &location.key;
            tracing::warn!(key, %error, "could not remove an upload's bytes; the cleanup job will retry");
        }
    }
}

impl App {
    /// The import request for a received upload, as `principal` asks it with `spec`
    /// (from [`crate::app::jobs::UploadImportBody::validate`]): the upload's session and
    /// creator, checked like a commit (whoever asked for the upload, or a privileged
    /// principal). The upload's state is checked again when the job is queued.
    pub async fn upload_import_request(
        &self,
        principal: &Principal,
        mut spec: crate::domain::job::ImportSpec,
    ) -> Result<super::jobs::ImportRequest, AppError> {
        let uuid = spec.upload_uuid.ok_or(DomainError::NotFound("upload"))?;
        let upload = self.upload_for(principal, uuid).await?;
        if !principal.is_privileged() && upload.requested_by != principal.actor() {
            return Err(AppError::Forbidden("only who asked for the upload may import it".into()));
        }
        spec.asset_creator = upload.creator;
        Ok(super::jobs::ImportRequest {
            id_session: SessionId::new(upload.id_session)
                .map_err(|error| AppError::Domain(DomainError::Invalid(error.to_string())))?,
            url: None,
            spec,
            upload_created_position: Some(upload.created_position),
        })
    }
}

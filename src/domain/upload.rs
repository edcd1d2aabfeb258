//! The two-phase upload aggregate (`upload-<uuid>` streams), the cloud file API flow: a
//! client asks for an upload (and gets a signed URL), sends the bytes to that URL in one
//! PUT, then either commits the upload as an asset or asks a job to import it. An upload
//! that is neither committed nor imported before its expiry expires, and its bytes go.
//!
//! The asset an upload becomes has the upload's uuid, and its bytes stay where the PUT
//! put them (the asset's event records that location): committing moves no byte.
//!
//! ```text
//! pending ──PUT──▶ received ──commit──────────────────────▶ committed
//!    │                │  └──import──▶ importing ──job ok──▶ committed
//!    │                │                  │  ├──job failed──▶ failed
//!    │                │                  │  └──job cancelled──▶ received
//!    └──expiry──▶ expired ◀──expiry──┘
//! ```

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::blob::BlobLocation;
use super::names::{FileName, MediaType, SessionId, Sha256Hex};
use super::principal::Actor;
use super::{domain_events, DomainError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct UploadStarted {
    pub upload_uuid: Uuid,
    pub id_session: SessionId,
    /// The file's name (the asset's `asset_original_filename`).
    pub filename: FileName,
    /// The type the client declared, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<MediaType>,
    /// The size the bytes must have, if declared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// The SHA-256 the bytes must have, if declared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<Sha256Hex>,
    /// Who the asset will name as its creator.
    pub upload_creator: Actor,
    /// Who asked for the upload.
    pub requested_by: Actor,
    /// Past it, the upload URL is refused and the upload expires unless committed or
    /// imported.
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct UploadReceived {
    pub upload_uuid: Uuid,
    pub id_session: SessionId,
    pub size: u64,
    pub sha256: Sha256Hex,
    /// The PUT's Content-Type, when it named one other than `application/octet-stream`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<MediaType>,
    /// Where the bytes are: the asset the upload becomes keeps them there.
    pub blob: BlobLocation,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct UploadImportQueued {
    pub upload_uuid: Uuid,
    pub id_session: SessionId,
    pub job_uuid: Uuid,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct UploadImportCancelled {
    pub upload_uuid: Uuid,
    pub id_session: SessionId,
    pub job_uuid: Uuid,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct UploadCommitted {
    pub upload_uuid: Uuid,
    pub id_session: SessionId,
    /// The asset it became (the upload's uuid).
    pub asset_uuid: Uuid,
    /// The import job that committed it; none for a commit by request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_uuid: Option<Uuid>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct UploadFailed {
    pub upload_uuid: Uuid,
    pub id_session: SessionId,
    /// The import job that failed.
    pub job_uuid: Uuid,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct UploadExpired {
    pub upload_uuid: Uuid,
    pub id_session: SessionId,
    /// Whether bytes had been received (and are removed).
    pub had_bytes: bool,
    /// Why: its time was over, or its session was deleted.
    #[serde(default)]
    pub reason: ExpiryReason,
}

/// Why an upload expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExpiryReason {
    /// Not committed or imported before `expires_at`.
    #[default]
    Expired,
    /// Its session was deleted (with the session's assets).
    SessionDeleted,
}

domain_events!(UploadEvent {
    UploadStarted(UploadStarted),
    UploadReceived(UploadReceived),
    UploadImportQueued(UploadImportQueued),
    UploadImportCancelled(UploadImportCancelled),
    UploadCommitted(UploadCommitted),
    UploadFailed(UploadFailed),
    UploadExpired(UploadExpired),
});

/// Where an upload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UploadStatus {
    /// No stream yet.
    #[default]
    New,
    Pending,
    Received,
    Importing,
    Committed,
    Failed,
    Expired,
}

impl UploadStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Pending => "pending",
            Self::Received => "received",
            Self::Importing => "importing",
            Self::Committed => "committed",
            Self::Failed => "failed",
            Self::Expired => "expired",
        }
    }
}

/// An upload's state folded from its stream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Upload {
    pub started: Option<UploadStarted>,
    pub received: Option<UploadReceived>,
    pub status: UploadStatus,
    /// The import job while importing (and the last one after).
    pub job_uuid: Option<Uuid>,
}

/// What may be asked of an upload.
#[derive(Debug, Clone)]
pub enum UploadCommand {
    Start(UploadStarted),
    Receive {
        received: UploadReceived,
        now: DateTime<Utc>,
    },
    /// A commit by request; the asset is recorded beside it.
    Commit {
        now: DateTime<Utc>,
    },
    QueueImport {
        job_uuid: Uuid,
        now: DateTime<Utc>,
    },
    /// The import job ended: with its asset, failed, or cancelled.
    ImportSucceeded {
        job_uuid: Uuid,
    },
    ImportFailed {
        job_uuid: Uuid,
        error: String,
    },
    ImportCancelled {
        job_uuid: Uuid,
    },
    Expire {
        now: DateTime<Utc>,
    },
    /// Its session is deleted: a pending or received upload goes with it.
    Discard,
}

impl Upload {
    /// [`crate::domain::Aggregate::handle`].
    pub fn decide(&self, command: UploadCommand) -> Result<Vec<UploadEvent>, DomainError> {
        match command {
            UploadCommand::Start(started) => self.handle_start(started),
            UploadCommand::Receive { received, now } => self.handle_receive(received, now),
            UploadCommand::Commit { now } => self.handle_commit(now),
            UploadCommand::QueueImport { job_uuid, now } => self.handle_queue_import(job_uuid, now),
            UploadCommand::ImportSucceeded { job_uuid } => self.handle_import_ended(job_uuid, None),
            UploadCommand::ImportFailed { job_uuid, error } => self.handle_import_ended(job_uuid, Some(Some(error))),
            UploadCommand::ImportCancelled { job_uuid } => self.handle_import_ended(job_uuid, Some(None)),
            UploadCommand::Expire { now } => self.handle_expire(now),
            UploadCommand::Discard => self.handle_discard(),
        }
    }

    pub fn apply(&mut self, event: &UploadEvent) {
        match event {
            UploadEvent::UploadStarted(started) => {
                self.started = Some(started.clone());
                self.status = UploadStatus::Pending;
            }
            UploadEvent::UploadReceived(received) => {
                self.received = Some(received.clone());
                self.status = UploadStatus::Received;
            }
            UploadEvent::UploadImportQueued(queued) => {
                self.job_uuid = Some(queued.job_uuid);
                self.status = UploadStatus::Importing;
            }
            UploadEvent::UploadImportCancelled(_) => self.status = UploadStatus::Received,
            UploadEvent::UploadCommitted(_) => self.status = UploadStatus::Committed,
            UploadEvent::UploadFailed(_) => self.status = UploadStatus::Failed,
            UploadEvent::UploadExpired(_) => self.status = UploadStatus::Expired,
        }
    }

    fn started(&self) -> Result<&UploadStarted, DomainError> {
        self.started.as_ref().ok_or(DomainError::NotFound("upload"))
    }

    /// Whether the upload's time is over at `now` (whether or not `UploadExpired` is
    /// recorded yet): it takes no bytes, commit or import then.
    pub fn is_past_expiry(&self, now: DateTime<Utc>) -> bool {
        match (&self.started, self.status) {
            (_, UploadStatus::Expired) => true,
            (Some(started), UploadStatus::Pending | UploadStatus::Received) => started.expires_at <= now,
            _ => false,
        }
    }

    fn refuse_if_expired(&self, now: DateTime<Utc>) -> Result<(), DomainError> {
        if self.is_past_expiry(now) {
            return Err(DomainError::Expired("the upload has expired".into()));
        }
        Ok(())
    }

    /// Why the upload cannot take its next step (commit, import) now.
    fn not_received(&self) -> DomainError {
        DomainError::Conflict(match self.status {
            UploadStatus::Pending => "the upload has not received its bytes yet".into(),
            UploadStatus::Importing => "the upload is being imported".into(),
            UploadStatus::Committed => "the upload is already committed".into(),
            UploadStatus::Failed => "the upload's import failed".into(),
            status => format!("the upload is {}", status.as_str()),
        })
    }

    pub fn handle_start(&self, started: UploadStarted) -> Result<Vec<UploadEvent>, DomainError> {
        if self.started.is_some() {
            return Err(DomainError::Conflict(format!("upload {} already exists", started.upload_uuid)));
        }
        Ok(vec![UploadEvent::UploadStarted(started)])
    }

    /// The bytes arrived (checked against what was declared, and durable).
    pub fn handle_receive(
        &self,
        received: UploadReceived,
        now: DateTime<Utc>,
    ) -> Result<Vec<UploadEvent>, DomainError> {
        let started = self.started()?;
        self.refuse_if_expired(now)?;
        if self.status != UploadStatus::Pending {
            return Err(DomainError::Conflict("the upload has already received its bytes".into()));
        }
        if started.size.is_some_and(|size| size != received.size) {
            return Err(DomainError::Invalid("the bytes do not have the declared size".into()));
        }
        if started.sha256.as_ref().is_some_and(|sha256| *sha256 != received.sha256) {
            return Err(DomainError::Invalid("the bytes do not have the declared SHA-256".into()));
        }
        Ok(vec![UploadEvent::UploadReceived(received)])
    }

    pub fn handle_commit(&self, now: DateTime<Utc>) -> Result<Vec<UploadEvent>, DomainError> {
        let started = self.started()?;
        self.refuse_if_expired(now)?;
        if self.status != UploadStatus::Received {
            return Err(self.not_received());
        }
        Ok(vec![UploadEvent::UploadCommitted(UploadCommitted {
            upload_uuid: started.upload_uuid,
            id_session: started.id_session,
            asset_uuid: started.upload_uuid,
            job_uuid: None,
        })])
    }

    pub fn handle_queue_import(&self, job_uuid: Uuid, now: DateTime<Utc>) -> Result<Vec<UploadEvent>, DomainError> {
        let started = self.started()?;
        self.refuse_if_expired(now)?;
        if self.status != UploadStatus::Received {
            return Err(self.not_received());
        }
        Ok(vec![UploadEvent::UploadImportQueued(UploadImportQueued {
            upload_uuid: started.upload_uuid,
            id_session: started.id_session,
            job_uuid,
        })])
    }

    /// The import job `job_uuid` ended: `None` with its asset, `Some(Some(error))`
    /// failed, `Some(None)` cancelled. A job that is not the upload's current import
    /// changes nothing.
    fn handle_import_ended(
        &self,
        job_uuid: Uuid,
        outcome: Option<Option<String>>,
    ) -> Result<Vec<UploadEvent>, DomainError> {
        let started = self.started()?;
        if self.status != UploadStatus::Importing || self.job_uuid != Some(job_uuid) {
            return match outcome {
                // Only a success must find its upload importing: an import that cannot
                // commit its upload must not make an asset either.
                None => Err(DomainError::Conflict("the upload is not being imported by this job".into())),
                Some(_) => Ok(vec![]),
            };
        }
        let (upload_uuid, id_session) = (started.upload_uuid, started.id_session);
        Ok(vec![match outcome {
            None => UploadEvent::UploadCommitted(UploadCommitted {
                upload_uuid,
                id_session,
                asset_uuid: upload_uuid,
                job_uuid: Some(job_uuid),
            }),
            Some(Some(error)) => UploadEvent::UploadFailed(UploadFailed { upload_uuid, id_session, job_uuid, error }),
            Some(None) => {
                UploadEvent::UploadImportCancelled(UploadImportCancelled { upload_uuid, id_session, job_uuid })
            }
        }])
    }

    /// Expires a pending or received upload past its time; anything else is left alone.
    pub fn handle_expire(&self, now: DateTime<Utc>) -> Result<Vec<UploadEvent>, DomainError> {
        let started = self.started()?;
        if !matches!(self.status, UploadStatus::Pending | UploadStatus::Received) || started.expires_at > now {
            return Ok(vec![]);
        }
        Ok(vec![self.expired(started, ExpiryReason::Expired)])
    }

    /// Expires a pending or received upload whose session is deleted, whatever its time.
    pub fn handle_discard(&self) -> Result<Vec<UploadEvent>, DomainError> {
        let started = self.started()?;
        if !matches!(self.status, UploadStatus::Pending | UploadStatus::Received) {
            return Ok(vec![]);
        }
        Ok(vec![self.expired(started, ExpiryReason::SessionDeleted)])
    }

    fn expired(&self, started: &UploadStarted, reason: ExpiryReason) -> UploadEvent {
        UploadEvent::UploadExpired(UploadExpired {
            upload_uuid: started.upload_uuid,
            id_session: started.id_session,
            had_bytes: self.received.is_some(),
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::blob::BackendKind;
    use crate::domain::principal::PrincipalKind;
    use crate::domain::DomainEvent;

    fn started(size: Option<u64>, expires_at: DateTime<Utc>) -> UploadStarted {
        let actor = Actor { kind: PrincipalKind::User, uuid: Uuid::nil() };
        UploadStarted {
            upload_uuid: Uuid::from_u128(7),
            id_session: SessionId::new(1).unwrap(),
            filename: FileName::parse("a.bin").unwrap(),
            mime_type: None,
            size,
            sha256: None,
            upload_creator: actor,
            requested_by: actor,
            expires_at,
        }
    }

    fn received(size: u64) -> UploadReceived {
        UploadReceived {
            upload_uuid: Uuid::from_u128(7),
            id_session: SessionId::new(1).unwrap(),
            size,
            sha256: Sha256Hex::parse(&"a".repeat(64)).unwrap(),
            content_type: None,
            blob: BlobLocation::new(BackendKind::Local, Uuid::from_u128(7)),
        }
    }

    fn after(upload: &Upload, events: Vec<UploadEvent>) -> Upload {
        let mut upload = upload.clone();
        events.iter().for_each(|e| upload.apply(e));
        upload
    }

    #[test]
    fn bytes_once_then_commit_once() {
        let now = Utc::now();
        let later = now + chrono::Duration::hours(1);
        let pending = after(&Upload::default(), vec![UploadEvent::UploadStarted(started(Some(3), later))]);
        assert!(matches!(pending.handle_commit(now), Err(DomainError::Conflict(_))), "before the bytes");
        assert!(matches!(pending.handle_receive(received(4), now), Err(DomainError::Invalid(_))), "declared size");
        let got = after(&pending, pending.handle_receive(received(3), now).unwrap());
        assert_eq!(got.status, UploadStatus::Received);
        assert!(matches!(got.handle_receive(received(3), now), Err(DomainError::Conflict(_))), "a second PUT");
        let committed = after(&got, got.handle_commit(now).unwrap());
        assert_eq!(committed.status, UploadStatus::Committed);
        assert!(matches!(committed.handle_commit(now), Err(DomainError::Conflict(_))), "commit twice");
        assert!(matches!(committed.handle_queue_import(Uuid::nil(), now), Err(DomainError::Conflict(_))));
        assert_eq!(committed.handle_expire(later + chrono::Duration::days(2)).unwrap(), vec![]);
    }

    #[test]
    fn an_import_commits_fails_or_gives_the_upload_back() {
        let now = Utc::now();
        let later = now + chrono::Duration::hours(1);
        let upload = after(&Upload::default(), vec![UploadEvent::UploadStarted(started(None, later))]);
        let upload = after(&upload, upload.handle_receive(received(3), now).unwrap());
        let job = Uuid::from_u128(9);
        let importing = after(&upload, upload.handle_queue_import(job, now).unwrap());
        assert!(matches!(importing.handle_commit(now), Err(DomainError::Conflict(_))), "no commit while importing");
        assert!(matches!(importing.handle_queue_import(job, now), Err(DomainError::Conflict(_))), "a second import");
        assert_eq!(
            importing.handle_expire(later + chrono::Duration::days(2)).unwrap(),
            vec![],
            "no expiry while importing"
        );
        let back = after(&importing, importing.decide(UploadCommand::ImportCancelled { job_uuid: job }).unwrap());
        assert_eq!(back.status, UploadStatus::Received);
        let failed = importing.decide(UploadCommand::ImportFailed { job_uuid: job, error: "x".into() }).unwrap();
        assert_eq!(after(&importing, failed).status, UploadStatus::Failed);
        let done = importing.decide(UploadCommand::ImportSucceeded { job_uuid: job }).unwrap();
        assert_eq!(after(&importing, done).status, UploadStatus::Committed);
        // Another job's end changes nothing; its success is refused.
        let other = Uuid::from_u128(10);
        assert_eq!(
            importing.decide(UploadCommand::ImportFailed { job_uuid: other, error: "x".into() }).unwrap(),
            vec![]
        );
        assert!(importing.decide(UploadCommand::ImportSucceeded { job_uuid: other }).is_err());
    }

    #[test]
    fn past_its_time_an_upload_takes_nothing_and_expires_once() {
        let now = Utc::now();
        let upload = after(&Upload::default(), vec![UploadEvent::UploadStarted(started(None, now))]);
        assert!(matches!(upload.handle_receive(received(1), now), Err(DomainError::Expired(_))));
        assert!(matches!(upload.handle_commit(now), Err(DomainError::Expired(_))));
        let expired = after(&upload, upload.handle_expire(now).unwrap());
        assert_eq!(expired.status, UploadStatus::Expired);
        assert_eq!(expired.handle_expire(now).unwrap(), vec![]);
        let discarded = after(&upload, upload.handle_discard().unwrap());
        assert_eq!(discarded.status, UploadStatus::Expired);
        assert_eq!(discarded.handle_discard().unwrap(), vec![]);
        let early = after(
            &Upload::default(),
            vec![UploadEvent::UploadStarted(started(None, now + chrono::Duration::seconds(5)))],
        );
        assert_eq!(early.handle_expire(now).unwrap(), vec![], "not before its time");
        let event = UploadEvent::UploadStarted(started(Some(1), now));
        assert_eq!(UploadEvent::from_parts(event.event_type(), &event.to_data()).unwrap().unwrap(), event);
    }
}

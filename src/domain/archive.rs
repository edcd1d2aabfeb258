//! The archive aggregate (`archive-<uuid>` streams): a zip of assets (a session's, or
//! a list of them) that a job builds for whoever asked, kept until it expires or is
//! deleted.
//!
//! ```text
//! pending ──attempt──▶ in_progress ──built──▶ completed ──expiry──▶ expired
//!    │                    │  └──(retry)──┐        │
//!    │                    └──job failed / cancelled──▶ failed
//!    └──────────── delete (any time before) ───────────▶ deleted
//! ```
//!
//! The archive's id is fixed when it is asked for and its bytes go under that id, so
//! however often its job runs (a retry after a crash), there is one archive.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::blob::BlobLocation;
use super::names::{SessionId, Sha256Hex};
use super::principal::Actor;
use super::{domain_events, DomainError};

/// Most assets one archive may name.
pub const MAX_ARCHIVE_ASSETS: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ArchiveRequested {
    pub archive_uuid: Uuid,
    /// The job that builds it.
    pub job_uuid: Uuid,
    /// The session whose live assets it holds (when asked for by session).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_session: Option<SessionId>,
    /// The assets it holds (when asked for by list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asset_uuids: Option<Vec<Uuid>>,
    /// Who asked: only they (and services, superadmins) reach it.
    pub archive_owner: Actor,
    /// Whether the owner reaches every asset (a service, a superadmin); else what a list
    /// names is held only while the owner still reaches it.
    #[serde(default)]
    pub owner_reaches_all: bool,
    /// The zip's file name for downloads.
    pub archive_original_filename: String,
    /// Built outside assetd and uploaded (OpenTera mode: OpenTera's
    /// AssetsArchiveWorker); `job_uuid` is then the archive's own uuid, no job's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub uploaded: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ArchiveStarted {
    pub archive_uuid: Uuid,
    pub job_uuid: Uuid,
    /// The job's attempt that builds it (1 for the first).
    pub attempt: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ArchiveCompleted {
    pub archive_uuid: Uuid,
    pub job_uuid: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_session: Option<SessionId>,
    pub archive_owner: Actor,
    pub archive_original_filename: String,
    /// The zip's size in bytes.
    pub size: u64,
    /// The zip's SHA-256.
    pub sha256: Sha256Hex,
    /// Files in the zip.
    pub entries: u64,
    /// Assets asked for that were deleted before the build read them (left out).
    #[serde(default)]
    pub skipped_assets: Vec<Uuid>,
    /// Where the zip is.
    pub blob: BlobLocation,
    /// Past it, the archive expires and its bytes go.
    pub expires_at: DateTime<Utc>,
    /// Its download, below the API root (`/file/api` behind nginx):
    /// `archives?archive_uuid=<uuid>`, with the owner's (or a service's) token.
    pub download_path: String,
    /// Who uploaded it, for an archive built outside assetd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_uploader: Option<Actor>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ArchiveFailed {
    pub archive_uuid: Uuid,
    pub job_uuid: Uuid,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ArchiveExpired {
    pub archive_uuid: Uuid,
    pub archive_owner: Actor,
    /// Its bytes, removed.
    pub blob: BlobLocation,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ArchiveDeleted {
    pub archive_uuid: Uuid,
    pub deleted_by: Actor,
    /// Its bytes, removed (none when it was not built).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<BlobLocation>,
}

domain_events!(ArchiveEvent {
    ArchiveRequested(ArchiveRequested),
    ArchiveStarted(ArchiveStarted),
    ArchiveCompleted(ArchiveCompleted),
    ArchiveFailed(ArchiveFailed),
    ArchiveExpired(ArchiveExpired),
    ArchiveDeleted(ArchiveDeleted),
});

/// Where an archive is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ArchiveStatus {
    /// No stream yet.
    #[default]
    New,
    Pending,
    InProgress,
    Completed,
    Failed,
    Expired,
    Deleted,
}

impl ArchiveStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Pending => "pending",
            Self::InProgress => "in_progress",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Deleted => "deleted",
        }
    }

    /// Still being made.
    fn is_building(self) -> bool {
        matches!(self, Self::Pending | Self::InProgress)
    }
}

/// An archive's state folded from its stream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Archive {
    pub requested: Option<ArchiveRequested>,
    pub completed: Option<ArchiveCompleted>,
    pub status: ArchiveStatus,
}

#[derive(Debug, Clone)]
pub enum ArchiveCommand {
    Request(ArchiveRequested),
    /// The job's attempt `attempt` starts building it.
    Start {
        job_uuid: Uuid,
        attempt: u32,
    },
    Complete(Box<ArchiveCompleted>),
    /// Its job failed for good, or was cancelled.
    Fail {
        job_uuid: Uuid,
        error: String,
    },
    /// Expires it if its time is over at `now`.
    Expire {
        now: DateTime<Utc>,
    },
    Delete(Actor),
}

impl Archive {
    pub fn decide(&self, command: ArchiveCommand) -> Result<Vec<ArchiveEvent>, DomainError> {
        match command {
            ArchiveCommand::Request(requested) => {
                if self.status != ArchiveStatus::New {
                    return Err(DomainError::Conflict(format!("archive {} already exists", requested.archive_uuid)));
                }
                Ok(vec![ArchiveEvent::ArchiveRequested(requested)])
            }
            ArchiveCommand::Start { job_uuid, attempt } => {
                self.building_by(job_uuid)?;
                Ok(vec![ArchiveEvent::ArchiveStarted(ArchiveStarted { archive_uuid: self.uuid()?, job_uuid, attempt })])
            }
            ArchiveCommand::Complete(completed) => {
                self.building_by(completed.job_uuid)?;
                Ok(vec![ArchiveEvent::ArchiveCompleted(*completed)])
            }
            ArchiveCommand::Fail { job_uuid, error } => {
                if !self.status.is_building() {
                    // Deleted (or finished) meanwhile: nothing more to say.
                    return Ok(vec![]);
                }
                self.building_by(job_uuid)?;
                Ok(vec![ArchiveEvent::ArchiveFailed(ArchiveFailed { archive_uuid: self.uuid()?, job_uuid, error })])
            }
            ArchiveCommand::Expire { now } => match &self.completed {
                Some(completed) if self.status == ArchiveStatus::Completed && completed.expires_at <= now => {
                    Ok(vec![ArchiveEvent::ArchiveExpired(ArchiveExpired {
                        archive_uuid: completed.archive_uuid,
                        archive_owner: completed.archive_owner,
                        blob: completed.blob.clone(),
                    })])
                }
                _ => Ok(vec![]),
            },
            ArchiveCommand::Delete(by) => match self.status {
                ArchiveStatus::New => Err(DomainError::NotFound("archive")),
                ArchiveStatus::Deleted => Err(DomainError::NotFound("archive")),
                status => Ok(vec![ArchiveEvent::ArchiveDeleted(ArchiveDeleted {
                    archive_uuid: self.uuid()?,
                    deleted_by: by,
                    blob: self
                        .completed
                        .as_ref()
                        .filter(|_| status == ArchiveStatus::Completed)
                        .map(|c| c.blob.clone()),
                })]),
            },
        }
    }

    pub fn apply(&mut self, event: &ArchiveEvent) {
        match event {
            ArchiveEvent::ArchiveRequested(requested) => {
                self.requested = Some(requested.clone());
                self.status = ArchiveStatus::Pending;
            }
            ArchiveEvent::ArchiveStarted(_) => self.status = ArchiveStatus::InProgress,
            ArchiveEvent::ArchiveCompleted(completed) => {
                self.completed = Some(completed.clone());
                self.status = ArchiveStatus::Completed;
            }
            ArchiveEvent::ArchiveFailed(_) => self.status = ArchiveStatus::Failed,
            ArchiveEvent::ArchiveExpired(_) => self.status = ArchiveStatus::Expired,
            ArchiveEvent::ArchiveDeleted(_) => self.status = ArchiveStatus::Deleted,
        }
    }

    fn uuid(&self) -> Result<Uuid, DomainError> {
        self.requested.as_ref().map(|r| r.archive_uuid).ok_or(DomainError::NotFound("archive"))
    }

    /// Refuses unless the archive is still being built by `job_uuid`.
    fn building_by(&self, job_uuid: Uuid) -> Result<(), DomainError> {
        let requested = self.requested.as_ref().ok_or(DomainError::NotFound("archive"))?;
        if requested.job_uuid != job_uuid {
            return Err(DomainError::Conflict("another job builds this archive".into()));
        }
        if !self.status.is_building() {
            return Err(DomainError::Conflict(format!("the archive is {}", self.status.as_str())));
        }
        Ok(())
    }
}

/// The path of an archive's download below the API root.
pub fn download_path(archive_uuid: Uuid) -> String {
    format!("archives?archive_uuid={archive_uuid}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::blob::BackendKind;
    use crate::domain::principal::PrincipalKind;

    fn owner() -> Actor {
        Actor { kind: PrincipalKind::User, uuid: Uuid::from_u128(7) }
    }

    fn requested(job_uuid: Uuid) -> ArchiveRequested {
        ArchiveRequested {
            archive_uuid: Uuid::from_u128(1),
            job_uuid,
            id_session: Some(SessionId::new(3).unwrap()),
            asset_uuids: None,
            archive_owner: owner(),
            owner_reaches_all: false,
            archive_original_filename: "3_visit.zip".into(),
            uploaded: false,
        }
    }

    fn completed(job_uuid: Uuid, expires_at: DateTime<Utc>) -> ArchiveCompleted {
        ArchiveCompleted {
            archive_uuid: Uuid::from_u128(1),
            job_uuid,
            id_session: Some(SessionId::new(3).unwrap()),
            archive_owner: owner(),
            archive_original_filename: "3_visit.zip".into(),
            size: 22,
            sha256: Sha256Hex::parse(&"a".repeat(64)).unwrap(),
            entries: 0,
            skipped_assets: vec![],
            blob: BlobLocation::new(BackendKind::Local, Uuid::from_u128(1)),
            expires_at,
            download_path: download_path(Uuid::from_u128(1)),
            archive_uploader: None,
        }
    }

    fn run(archive: &mut Archive, command: ArchiveCommand) -> Result<Vec<ArchiveEvent>, DomainError> {
        let events = archive.decide(command)?;
        events.iter().for_each(|e| archive.apply(e));
        Ok(events)
    }

    #[test]
    fn an_archive_is_built_once_by_its_job_then_expires() {
        let job = Uuid::from_u128(9);
        let now = Utc::now();
        let mut archive = Archive::default();
        run(&mut archive, ArchiveCommand::Request(requested(job))).unwrap();
        assert!(run(&mut archive, ArchiveCommand::Request(requested(job))).is_err(), "asked for once");
        assert!(run(&mut archive, ArchiveCommand::Start { job_uuid: Uuid::from_u128(10), attempt: 1 }).is_err());
        run(&mut archive, ArchiveCommand::Start { job_uuid: job, attempt: 1 }).unwrap();
        run(&mut archive, ArchiveCommand::Start { job_uuid: job, attempt: 2 }).unwrap();
        assert_eq!(archive.status, ArchiveStatus::InProgress);
        run(&mut archive, ArchiveCommand::Complete(Box::new(completed(job, now)))).unwrap();
        assert!(run(&mut archive, ArchiveCommand::Complete(Box::new(completed(job, now)))).is_err(), "built once");
        assert!(run(&mut archive, ArchiveCommand::Expire { now: now - chrono::Duration::seconds(1) })
            .unwrap()
            .is_empty());
        let expired = run(&mut archive, ArchiveCommand::Expire { now }).unwrap();
        assert!(matches!(&expired[..], [ArchiveEvent::ArchiveExpired(_)]));
        assert!(run(&mut archive, ArchiveCommand::Expire { now }).unwrap().is_empty(), "expires once");
        let deleted = run(&mut archive, ArchiveCommand::Delete(owner())).unwrap();
        assert!(matches!(&deleted[..], [ArchiveEvent::ArchiveDeleted(ArchiveDeleted { blob: None, .. })]));
        assert_eq!(run(&mut archive, ArchiveCommand::Delete(owner())), Err(DomainError::NotFound("archive")));
    }

    #[test]
    fn a_deleted_archive_is_not_failed_or_completed_by_its_job_afterwards() {
        let job = Uuid::from_u128(9);
        let mut archive = Archive::default();
        run(&mut archive, ArchiveCommand::Request(requested(job))).unwrap();
        run(&mut archive, ArchiveCommand::Delete(owner())).unwrap();
        assert!(run(&mut archive, ArchiveCommand::Fail { job_uuid: job, error: "x".into() }).unwrap().is_empty());
        assert!(run(&mut archive, ArchiveCommand::Complete(Box::new(completed(job, Utc::now())))).is_err());
        assert_eq!(archive.status, ArchiveStatus::Deleted);
    }
}

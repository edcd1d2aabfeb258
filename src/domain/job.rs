//! The job aggregate (`job-<uuid>` streams): a piece of long work (an import today)
//! asked for by a client and run by a worker. Its stream is its whole life: queued,
//! each attempt started (with a lease the worker keeps alive by reporting progress),
//! retried later or failed, succeeded, or cancelled. A job starts only by an append
//! with the expected version, so two workers can never both run one attempt.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::names::{AssetName, Directory, MediaType, SessionId, Sha256Hex, Tags};
use super::principal::Actor;
use super::{domain_events, DomainError};

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Fetch a URL into a session as a new asset, or turn a received two-phase upload
    /// into one.
    Import,
    /// Expire the two-phase uploads past their time (no session: the whole deployment).
    ExpireUploads,
    /// Build an archive (a zip of assets) into the blob store.
    Archive,
    /// Keep storage clean (no session): expire archives and uploads past their time,
    /// remove orphan blobs, stale temporary files and old command receipts.
    Cleanup,
    /// Delete the assets of a deleted session, in batches.
    PurgeSession,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Import => "import",
            Self::ExpireUploads => "expire_uploads",
            Self::Archive => "archive",
            Self::Cleanup => "cleanup",
            Self::PurgeSession => "purge_session",
        }
    }
}

/// What an import makes: the asset's fields, as for an upload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ImportSpec {
    /// The source, without credentials and with secret-looking query values replaced
    /// (the full URL is kept out of the event log, which every consumer reads); absent
    /// for the import of a two-phase upload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_url: Option<String>,
    /// The received two-phase upload to import (instead of a URL); the asset has its uuid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_uuid: Option<Uuid>,
    /// As asked for (imports of uploads); else the upload time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asset_datetime: Option<DateTime<Utc>>,
    pub asset_name: AssetName,
    /// As asked for; else the response's Content-Type, else guessed from the name.
    pub asset_type: Option<MediaType>,
    /// When given, the fetched bytes must have this SHA-256.
    pub sha256: Option<Sha256Hex>,
    pub directory: Directory,
    pub tags: Tags,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub asset_creator: Actor,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct JobQueued {
    pub job_uuid: Uuid,
    pub kind: JobKind,
    /// The session it works on; none for a job on the whole deployment (expiry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_session: Option<SessionId>,
    pub requested_by: Actor,
    /// Attempts before the job fails for good.
    pub max_attempts: u32,
    /// For `kind: import`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import: Option<ImportSpec>,
    /// For `kind: archive`: the archive it builds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_uuid: Option<Uuid>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct JobStarted {
    pub job_uuid: Uuid,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Which worker runs it (host and process).
    pub worker: String,
    /// Until when the attempt is the worker's; it extends it with each `JobProgressed`.
    /// Past it, the worker is taken for lost and the job is run again.
    pub lease_until: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct JobProgressed {
    pub job_uuid: Uuid,
    pub attempt: u32,
    pub done: u64,
    /// Unknown until the source says.
    pub total: Option<u64>,
    pub lease_until: DateTime<Utc>,
}

/// What a job made, by kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum JobResult {
    // Untagged: read back as the first variant whose fields match, so the variants with
    // more fields come before those whose fields they include.
    Import(ImportResult),
    Archive(ArchiveResult),
    Cleanup(CleanupResult),
    PurgeSession(PurgeResult),
    ExpireUploads(ExpiryResult),
}

impl JobResult {
    /// The work done, as the job's progress shows it once finished (bytes, uploads).
    pub fn done(&self) -> u64 {
        match self {
            Self::Import(import) => import.asset_file_size,
            Self::ExpireUploads(expiry) => expiry.uploads_expired,
            Self::Archive(archive) => archive.archived_bytes,
            Self::Cleanup(cleanup) => cleanup.removed(),
            Self::PurgeSession(purge) => purge.assets_deleted,
        }
    }
}

/// What an archive job made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ArchiveResult {
    pub archive_uuid: Uuid,
    pub archive_file_size: u64,
    pub archive_sha256: Sha256Hex,
    /// Files in the zip.
    pub entries: u64,
    /// Bytes of the assets read into it (what the job's progress counts).
    #[serde(default)]
    pub archived_bytes: u64,
}

/// What a cleanup did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CleanupResult {
    pub archives_expired: u64,
    pub uploads_expired: u64,
    /// Blobs no asset, archive or upload referred to, older than the grace period.
    pub orphan_blobs_removed: u64,
    pub temp_files_removed: u64,
    pub command_receipts_removed: u64,
}

impl CleanupResult {
    pub fn removed(&self) -> u64 {
        self.archives_expired
            + self.uploads_expired
            + self.orphan_blobs_removed
            + self.temp_files_removed
            + self.command_receipts_removed
    }
}

/// What the purge of a deleted session's assets did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PurgeResult {
    pub assets_deleted: u64,
}

/// What an import made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ImportResult {
    /// The asset the import created.
    pub asset_uuid: Uuid,
    pub asset_file_size: u64,
    pub asset_sha256: Sha256Hex,
}

/// What an expiry of uploads did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ExpiryResult {
    pub uploads_expired: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct JobSucceeded {
    pub job_uuid: Uuid,
    pub attempt: u32,
    pub result: JobResult,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct JobFailed {
    pub job_uuid: Uuid,
    pub attempt: u32,
    pub error: String,
    /// Whether the last error was of a kind that may pass (the job ran out of attempts)
    /// or one that will not (a 404, a checksum mismatch).
    pub retryable: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct JobRetryScheduled {
    pub job_uuid: Uuid,
    /// The attempt that will run next: the next one after a failure, the same one
    /// again when its worker stopped (shutdown) and handed it back.
    pub attempt: u32,
    /// Not before then.
    pub at: DateTime<Utc>,
    /// Why the last attempt failed, or was handed back.
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct JobCancelled {
    pub job_uuid: Uuid,
    pub cancelled_by: Actor,
}

domain_events!(JobEvent {
    JobQueued(Box<JobQueued>),
    JobStarted(JobStarted),
    JobProgressed(JobProgressed),
    JobSucceeded(JobSucceeded),
    JobFailed(JobFailed),
    JobRetryScheduled(JobRetryScheduled),
    JobCancelled(JobCancelled),
});

/// Where a job is.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum JobStatus {
    /// No stream yet.
    #[default]
    New,
    Queued,
    Running {
        attempt: u32,
        lease_until: DateTime<Utc>,
    },
    RetryScheduled {
        attempt: u32,
        at: DateTime<Utc>,
    },
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn is_finished(&self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// A job's state folded from its stream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Job {
    pub queued: Option<JobQueued>,
    pub status: JobStatus,
    /// Attempts started so far.
    pub attempts: u32,
    pub last_error: Option<String>,
}

/// What a worker may do with a job it was handed.
#[derive(Debug, Clone, PartialEq)]
pub enum NextStep {
    /// Start attempt `n` now.
    Start(u32),
    /// Not before `at` (a retry's delay, or another worker's lease).
    Wait(DateTime<Utc>),
    /// Nothing: the job is finished.
    Done,
}

/// What may be asked of a job (by its requester, its worker, the lease sweeper).
#[derive(Debug, Clone)]
pub enum JobCommand {
    Queue(Box<JobQueued>),
    Start {
        attempt: u32,
        worker: String,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    },
    Progress {
        attempt: u32,
        done: u64,
        total: Option<u64>,
        lease_until: DateTime<Utc>,
    },
    Succeed {
        attempt: u32,
        result: JobResult,
    },
    Fail {
        attempt: u32,
        error: String,
        retryable: bool,
        retry_at: DateTime<Utc>,
    },
    ExpireLease {
        now: DateTime<Utc>,
        retry_at: DateTime<Utc>,
    },
    /// The worker stops (shutdown) during `attempt`: the attempt runs again, at once,
    /// and does not count against the job's attempts.
    Release {
        attempt: u32,
        now: DateTime<Utc>,
    },
    Cancel(Actor),
}

impl Job {
    /// [`crate::domain::Aggregate::handle`].
    pub fn decide(&self, command: JobCommand) -> Result<Vec<JobEvent>, DomainError> {
        match command {
            JobCommand::Queue(queued) => self.handle_queue(*queued),
            JobCommand::Start { attempt, worker, now, lease_until } => {
                self.handle_start(attempt, &worker, now, lease_until)
            }
            JobCommand::Progress { attempt, done, total, lease_until } => {
                self.handle_progress(attempt, done, total, lease_until)
            }
            JobCommand::Succeed { attempt, result } => self.handle_succeed(attempt, result),
            JobCommand::Fail { attempt, error, retryable, retry_at } => {
                self.handle_fail(attempt, error, retryable, retry_at)
            }
            JobCommand::ExpireLease { now, retry_at } => self.handle_lease_expired(now, retry_at),
            JobCommand::Release { attempt, now } => self.handle_release(attempt, now),
            JobCommand::Cancel(by) => self.handle_cancel(by),
        }
    }

    pub fn apply(&mut self, event: &JobEvent) {
        match event {
            JobEvent::JobQueued(queued) => {
                self.queued = Some((**queued).clone());
                self.status = JobStatus::Queued;
            }
            JobEvent::JobStarted(started) => {
                self.attempts = started.attempt;
                self.status = JobStatus::Running { attempt: started.attempt, lease_until: started.lease_until };
            }
            JobEvent::JobProgressed(progressed) => {
                if let JobStatus::Running { lease_until, .. } = &mut self.status {
                    *lease_until = progressed.lease_until;
                }
            }
            JobEvent::JobSucceeded(_) => self.status = JobStatus::Succeeded,
            JobEvent::JobFailed(failed) => {
                self.last_error = Some(failed.error.clone());
                self.status = JobStatus::Failed;
            }
            JobEvent::JobRetryScheduled(retry) => {
                self.last_error = Some(retry.error.clone());
                self.status = JobStatus::RetryScheduled { attempt: retry.attempt, at: retry.at };
            }
            JobEvent::JobCancelled(_) => self.status = JobStatus::Cancelled,
        }
    }

    fn uuid(&self) -> Result<Uuid, DomainError> {
        self.queued.as_ref().map(|q| q.job_uuid).ok_or(DomainError::NotFound("job"))
    }

    pub fn max_attempts(&self) -> u32 {
        self.queued.as_ref().map_or(1, |q| q.max_attempts.max(1))
    }

    pub fn handle_queue(&self, queued: JobQueued) -> Result<Vec<JobEvent>, DomainError> {
        if self.queued.is_some() {
            return Err(DomainError::Conflict(format!("job {} already exists", queued.job_uuid)));
        }
        Ok(vec![JobEvent::JobQueued(Box::new(queued))])
    }

    /// What a worker handed this job should do at `now`.
    pub fn next_step(&self, now: DateTime<Utc>) -> NextStep {
        match &self.status {
            JobStatus::New | JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled => NextStep::Done,
            JobStatus::Queued => NextStep::Start(self.attempts + 1),
            JobStatus::RetryScheduled { attempt, at } if *at <= now => NextStep::Start(*attempt),
            JobStatus::RetryScheduled { at, .. } => NextStep::Wait(*at),
            // Another worker holds it; once its lease is gone, the lease sweeper
            // schedules the next attempt.
            JobStatus::Running { lease_until, .. } => NextStep::Wait(*lease_until),
        }
    }

    /// Starts `attempt` (what [`Job::next_step`] said) for `worker`.
    pub fn handle_start(
        &self,
        attempt: u32,
        worker: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<JobEvent>, DomainError> {
        if self.next_step(now) != NextStep::Start(attempt) {
            return Err(DomainError::Conflict(format!("attempt {attempt} of this job cannot start now")));
        }
        Ok(vec![JobEvent::JobStarted(JobStarted {
            job_uuid: self.uuid()?,
            attempt,
            worker: worker.to_owned(),
            lease_until,
        })])
    }

    /// The running attempt, or a conflict (cancelled, or taken over after a lost lease).
    fn running(&self, attempt: u32) -> Result<(), DomainError> {
        match self.status {
            JobStatus::Running { attempt: running, .. } if running == attempt => Ok(()),
            JobStatus::Cancelled => Err(DomainError::Conflict("the job was cancelled".into())),
            _ => Err(DomainError::Conflict(format!("attempt {attempt} of this job is no longer running"))),
        }
    }

    pub fn handle_progress(
        &self,
        attempt: u32,
        done: u64,
        total: Option<u64>,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<JobEvent>, DomainError> {
        self.running(attempt)?;
        Ok(vec![JobEvent::JobProgressed(JobProgressed { job_uuid: self.uuid()?, attempt, done, total, lease_until })])
    }

    pub fn handle_succeed(&self, attempt: u32, result: JobResult) -> Result<Vec<JobEvent>, DomainError> {
        self.running(attempt)?;
        Ok(vec![JobEvent::JobSucceeded(JobSucceeded { job_uuid: self.uuid()?, attempt, result })])
    }

    /// An attempt failed: retried at `retry_at` if the error may pass and attempts are
    /// left, else the job fails.
    pub fn handle_fail(
        &self,
        attempt: u32,
        error: String,
        retryable: bool,
        retry_at: DateTime<Utc>,
    ) -> Result<Vec<JobEvent>, DomainError> {
        self.running(attempt)?;
        let job_uuid = self.uuid()?;
        if retryable && attempt < self.max_attempts() {
            return Ok(vec![JobEvent::JobRetryScheduled(JobRetryScheduled {
                job_uuid,
                attempt: attempt + 1,
                at: retry_at,
                error,
            })]);
        }
        Ok(vec![JobEvent::JobFailed(JobFailed { job_uuid, attempt, error, retryable })])
    }

    /// The worker of the running attempt stopped renewing its lease (it died, or lost
    /// the database): the attempt counts as failed, retryably.
    pub fn handle_lease_expired(
        &self,
        now: DateTime<Utc>,
        retry_at: DateTime<Utc>,
    ) -> Result<Vec<JobEvent>, DomainError> {
        match self.status {
            JobStatus::Running { attempt, lease_until } if lease_until < now => {
                let error = format!("attempt {attempt}'s worker stopped reporting (lease ended {lease_until})");
                self.handle_fail(attempt, error, true, retry_at)
            }
            _ => Ok(vec![]),
        }
    }

    /// A worker that stops hands its attempt back: the same attempt is scheduled again
    /// now, so a shutdown never uses up one of the job's attempts.
    pub fn handle_release(&self, attempt: u32, now: DateTime<Utc>) -> Result<Vec<JobEvent>, DomainError> {
        self.running(attempt)?;
        Ok(vec![JobEvent::JobRetryScheduled(JobRetryScheduled {
            job_uuid: self.uuid()?,
            attempt,
            at: now,
            error: format!("attempt {attempt}'s worker stopped (shutdown); the attempt runs again"),
        })])
    }

    /// Cancels a job that has not finished; cancelling a cancelled job changes nothing.
    pub fn handle_cancel(&self, by: Actor) -> Result<Vec<JobEvent>, DomainError> {
        match self.status {
            JobStatus::New => Err(DomainError::NotFound("job")),
            JobStatus::Cancelled => Ok(vec![]),
            JobStatus::Succeeded | JobStatus::Failed => {
                Err(DomainError::Conflict("the job has already finished".into()))
            }
            _ => Ok(vec![JobEvent::JobCancelled(JobCancelled { job_uuid: self.uuid()?, cancelled_by: by })]),
        }
    }
}

/// The id of the asset a job makes: derived from the job, so that however often the job
/// runs (a redelivery, a retry after a crash) it can only ever create that one asset.
pub fn asset_uuid_of(job_uuid: Uuid) -> Uuid {
    Uuid::new_v5(&ASSET_OF_JOB, job_uuid.as_bytes())
}

/// The namespace of [`asset_uuid_of`] (a fixed random uuid).
const ASSET_OF_JOB: Uuid = Uuid::from_u128(0x6e0f_3c4e_5a0b_4f7e_9d2c_1b7a_8e55_d301);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::principal::PrincipalKind;
    use crate::domain::DomainEvent;

    fn queued(max_attempts: u32) -> JobEvent {
        JobEvent::JobQueued(Box::new(JobQueued {
            job_uuid: Uuid::new_v4(),
            kind: JobKind::Import,
            id_session: Some(SessionId::new(1).unwrap()),
            requested_by: Actor { kind: PrincipalKind::Service, uuid: Uuid::nil() },
            max_attempts,
            import: None,
            archive_uuid: None,
        }))
    }

    fn given(events: &[JobEvent]) -> Job {
        let mut job = Job::default();
        events.iter().for_each(|e| job.apply(e));
        job
    }

    fn then(job: &Job, events: Vec<JobEvent>) -> Job {
        let mut job = job.clone();
        events.iter().for_each(|e| job.apply(e));
        job
    }

    #[test]
    fn a_job_starts_once_per_attempt_and_retries_until_out_of_attempts() {
        let now = Utc::now();
        let lease = now + chrono::Duration::seconds(20);
        let job = given(&[queued(2)]);
        assert_eq!(job.next_step(now), NextStep::Start(1));
        let running = then(&job, job.handle_start(1, "w", now, lease).unwrap());
        // A second worker cannot start it while the lease holds.
        assert_eq!(running.next_step(now), NextStep::Wait(lease));
        assert!(running.handle_start(1, "w2", now, lease).is_err());
        let retry_at = now + chrono::Duration::seconds(1);
        let retrying = then(&running, running.handle_fail(1, "boom".into(), true, retry_at).unwrap());
        assert_eq!(retrying.status, JobStatus::RetryScheduled { attempt: 2, at: retry_at });
        assert_eq!(retrying.next_step(now), NextStep::Wait(retry_at));
        assert_eq!(retrying.next_step(retry_at), NextStep::Start(2));
        let second = then(&retrying, retrying.handle_start(2, "w", retry_at, lease).unwrap());
        let failed = then(&second, second.handle_fail(2, "boom again".into(), true, retry_at).unwrap());
        assert_eq!(failed.status, JobStatus::Failed);
        assert_eq!(failed.last_error.as_deref(), Some("boom again"));
        assert_eq!(failed.next_step(now), NextStep::Done);
    }

    #[test]
    fn errors_that_will_not_pass_fail_at_once() {
        let now = Utc::now();
        let job = given(&[queued(5)]);
        let running = then(&job, job.handle_start(1, "w", now, now).unwrap());
        let events = running.handle_fail(1, "404".into(), false, now).unwrap();
        assert!(matches!(&events[..], [JobEvent::JobFailed(JobFailed { retryable: false, .. })]));
    }

    #[test]
    fn a_lost_lease_is_a_retryable_failure_and_cancelled_jobs_stop_their_worker() {
        let now = Utc::now();
        let job = given(&[queued(3)]);
        let running = then(&job, job.handle_start(1, "w", now, now).unwrap());
        assert_eq!(running.handle_lease_expired(now, now).unwrap(), vec![]);
        let later = now + chrono::Duration::seconds(1);
        let retried = then(&running, running.handle_lease_expired(later, later).unwrap());
        assert_eq!(retried.status, JobStatus::RetryScheduled { attempt: 2, at: later });
        // The lost worker's late report is refused.
        assert!(retried.handle_progress(1, 1, None, later).is_err());
        let cancelled =
            then(&retried, retried.handle_cancel(Actor { kind: PrincipalKind::User, uuid: Uuid::nil() }).unwrap());
        assert_eq!(cancelled.next_step(later), NextStep::Done);
        assert!(cancelled.handle_cancel(Actor { kind: PrincipalKind::User, uuid: Uuid::nil() }).unwrap().is_empty());
        assert!(matches!(cancelled.handle_succeed(2, sample_result()), Err(DomainError::Conflict(_))));
    }

    #[test]
    fn a_released_attempt_runs_again_without_using_up_an_attempt() {
        let now = Utc::now();
        let job = given(&[queued(1)]);
        let running = then(&job, job.handle_start(1, "w", now, now).unwrap());
        assert!(running.handle_release(2, now).is_err(), "only the running attempt");
        let released = then(&running, running.handle_release(1, now).unwrap());
        assert_eq!(released.next_step(now), NextStep::Start(1), "the last attempt is still there to run");
        let again = then(&released, released.handle_start(1, "w2", now, now).unwrap());
        assert_eq!(again.attempts, 1);
        let failed = then(&again, again.handle_fail(1, "503".into(), true, now).unwrap());
        assert_eq!(failed.status, JobStatus::Failed, "one attempt allowed, one used");
    }

    fn sample_result() -> JobResult {
        JobResult::Import(ImportResult {
            asset_uuid: Uuid::nil(),
            asset_file_size: 0,
            asset_sha256: Sha256Hex::parse(&"a".repeat(64)).unwrap(),
        })
    }

    #[test]
    fn events_round_trip_and_the_asset_id_is_the_jobs() {
        let event = queued(1);
        assert_eq!(JobEvent::from_parts(event.event_type(), &event.to_data()).unwrap().unwrap(), event);
        let job = Uuid::new_v4();
        assert_eq!(asset_uuid_of(job), asset_uuid_of(job));
        assert_ne!(asset_uuid_of(job), asset_uuid_of(Uuid::new_v4()));
    }
}

//! The job engine (EVENTS.md "Jobs"): workers that consume `<prefix>.jobs`, and the
//! scheduler that turns `JobRetryScheduled` into delayed messages and notices workers
//! that vanished.
//!
//! A job's message says only which job; its stream says everything else. A worker
//! loads the stream: a finished job is acked and skipped (redeliveries are harmless);
//! a job held by another worker's live lease is left to it (if that worker vanished,
//! the scheduler's lease sweep schedules the next attempt); a job not yet due goes back
//! to the retry queues for what is left of its delay; otherwise the worker appends
//! `JobStarted{attempt}` with the expected version (two workers cannot both start it),
//! runs the handler while renewing its lease with `JobProgressed` (at most once a
//! second), appends the outcome, and only then acks.
//!
//! Handlers are idempotent: an import's asset id derives from the job and its stream
//! is created with expected version `NoStream`, so a crash and a redelivery cannot make
//! a second asset.

pub mod archive;
pub mod fetch;
pub mod topology;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::app::jobs::{AttemptState, JobPolicy, LoadedJob};
use crate::app::{App, AppError, CommandContext, ComponentState};
use crate::blobs::SealedBlob;
use crate::broker::{Broker, BrokerChannel, BrokerError};
use crate::domain::asset::AssetImported;
use crate::domain::job::{ExpiryResult, JobKind, JobResult, JobStatus, NextStep, PurgeResult};
use crate::domain::principal::{Actor, PrincipalKind};
use crate::domain::DomainError;
use crate::eventstore::RecordedEvent;
use crate::subscriber::{self, LogHandler, PartlyHandled, SubscriberError, Subscription};
use archive::ArchiveBuilt;
use fetch::{FetchError, Fetcher};

/// How failed attempts are retried: `base * 2^(attempt-1)`, capped, with jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The delay after attempt `attempt` failed: full exponential delay, minus up to a
    /// fifth at random, so that jobs that failed together do not come back together.
    pub fn after(&self, attempt: u32) -> Duration {
        let exponential = self.base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let capped = exponential.min(self.max);
        capped.mul_f64(1.0 - rand::random::<f64>() * 0.2)
    }
}

/// `now + delay`, or the far future where that would overflow (an absurd configured
/// delay must not panic a worker).
fn later(now: chrono::DateTime<Utc>, delay: Duration) -> chrono::DateTime<Utc> {
    chrono::Duration::from_std(delay)
        .ok()
        .and_then(|delay| now.checked_add_signed(delay))
        .unwrap_or(chrono::DateTime::<Utc>::MAX_UTC)
}

/// Everything a worker needs.
#[derive(Clone)]
pub struct WorkerConfig {
    pub broker: Broker,
    /// AMQP names' prefix (`<prefix>.jobs`, …).
    pub prefix: String,
    /// Names this worker in `JobStarted` (host and process).
    pub worker_id: String,
    /// Imports run at once by this worker.
    pub import_concurrency: usize,
    pub import_policy: JobPolicy,
    /// How long an attempt is the worker's without a word from it.
    pub lease: Duration,
    pub backoff: Backoff,
    pub fetcher: Fetcher,
    /// How long a completed archive is kept.
    pub archive_ttl: Duration,
    /// What the cleanup job keeps.
    pub cleanup: crate::app::cleanup::CleanupPolicy,
}

/// This process's worker name: host and pid.
pub fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}:{}", host.trim(), std::process::id())
}

/// The job a message names: the envelope of `JobQueued` or `JobRetryScheduled`.
fn job_of(body: &[u8]) -> Option<Uuid> {
    let envelope: serde_json::Value = serde_json::from_slice(body).ok()?;
    envelope.get("data")?.get("job_uuid")?.as_str()?.parse().ok()
}

/// The context of what a worker records for a job: the system as actor, the request's
/// correlation id.
fn worker_context(job_uuid: Uuid, loaded: &LoadedJob) -> CommandContext {
    CommandContext {
        actor: Actor { kind: PrincipalKind::Service, uuid: Uuid::nil() },
        request_id: job_uuid.to_string(),
        correlation_id: loaded.correlation_id.clone(),
        message: None,
    }
}

/// Runs a worker until `stop` is cancelled: consumes `<prefix>.jobs` (reconnecting with
/// backoff). At stop, running attempts are stopped and scheduled again at once, for
/// whichever worker runs next.
pub async fn run(app: App, config: WorkerConfig, stop: CancellationToken) {
    let limits: HashMap<JobKind, Arc<tokio::sync::Semaphore>> = HashMap::from([
        (JobKind::Import, Arc::new(tokio::sync::Semaphore::new(config.import_concurrency.max(1)))),
        // One expiry at a time per worker is plenty: it is a sweep of the whole deployment.
        (JobKind::ExpireUploads, Arc::new(tokio::sync::Semaphore::new(1))),
        (JobKind::Cleanup, Arc::new(tokio::sync::Semaphore::new(1))),
        // Deflating is CPU work: one archive at a time per worker leaves the other core
        // to the API.
        (JobKind::Archive, Arc::new(tokio::sync::Semaphore::new(1))),
        (JobKind::PurgeSession, Arc::new(tokio::sync::Semaphore::new(1))),
    ]);
    let worker = Arc::new(Worker { app, config, limits, running: TaskTracker::new(), stop: stop.clone() });
    let mut backoff = Duration::from_millis(200);
    while !stop.is_cancelled() {
        worker.app.messaging.set_workers(ComponentState::Connecting);
        let result = worker.clone().consume().await;
        if worker.app.messaging.workers() == ComponentState::Up {
            backoff = Duration::from_millis(200);
        }
        if let Err(error) = result {
            tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "job worker stopped; starting over");
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
    worker.running.close();
    worker.running.wait().await;
    worker.app.messaging.set_workers(ComponentState::Disabled);
}

struct Worker {
    app: App,
    config: WorkerConfig,
    limits: HashMap<JobKind, Arc<tokio::sync::Semaphore>>,
    /// The deliveries being handled.
    running: TaskTracker,
    stop: CancellationToken,
}

/// What became of a delivery.
enum Handled {
    Ack,
    /// Back to the queue (the database is out of reach, say).
    Requeue(String),
}

impl Worker {
    /// As many messages as the kinds' limits together (not what is free now: a
    /// consumer that starts over while attempts still run keeps the same bound).
    fn prefetch(&self) -> u16 {
        // Imports, plus one of each other kind.
        u16::try_from(self.config.import_concurrency.max(1) + self.limits.len() - 1).unwrap_or(u16::MAX)
    }

    async fn consume(self: Arc<Self>) -> Result<(), BrokerError> {
        let channel = Arc::new(self.config.broker.dedicated_channel().await?);
        let result = async {
            topology::declare(&channel, &self.config.prefix).await?;
            // Bounded prefetch: the broker hands this worker no more than it can run.
            channel.basic_qos(self.prefetch(), BasicQosOptions::default()).await?;
            let mut deliveries = channel
                .basic_consume(
                    topology::jobs_queue(&self.config.prefix).as_str().into(),
                    format!("assetd-worker-{}", self.config.worker_id).as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            self.app.messaging.set_workers(ComponentState::Up);
            tracing::info!(queue = %topology::jobs_queue(&self.config.prefix), "running jobs");
            loop {
                let delivery = tokio::select! {
                    biased;
                    _ = self.stop.cancelled() => return Ok(()),
                    delivery = deliveries.next() => delivery,
                };
                let Some(delivery) = delivery else { return Ok(()) };
                let delivery = delivery?;
                let (worker, channel) = (self.clone(), channel.clone());
                self.running.spawn(async move { worker.deliver(&channel, delivery).await });
            }
        }
        .await;
        let result: Result<(), lapin::Error> = result;
        if self.stop.is_cancelled() {
            // Running attempts finish (recording a retry) before the channel goes.
            self.running.close();
            self.running.wait().await;
            self.running.reopen();
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), channel.close(200, "worker stopped".into())).await;
        result.map_err(BrokerError::from)
    }

    async fn deliver(&self, channel: &BrokerChannel, delivery: Delivery) {
        let outcome = match job_of(&delivery.data) {
            None => {
                tracing::warn!("a job message that names no job; dropped");
                Ok(Handled::Ack)
            }
            Some(job_uuid) => self.handle(channel, job_uuid, &delivery).await,
        };
        let acked = match outcome {
            Ok(Handled::Ack) => delivery.ack(BasicAckOptions::default()).await,
            Ok(Handled::Requeue(reason)) => {
                tracing::warn!(%reason, "a job message goes back to the queue");
                tokio::time::sleep(Duration::from_secs(1)).await;
                delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await
            }
            Err(error) => {
                tracing::warn!(%error, "a job could not be handled now; back to the queue");
                tokio::time::sleep(Duration::from_secs(1)).await;
                delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await
            }
        };
        if let Err(error) = acked {
            // The broker redelivers it; the job's stream makes that harmless.
            tracing::warn!(%error, "could not settle a job message");
        }
    }

    async fn handle(&self, channel: &BrokerChannel, job_uuid: Uuid, delivery: &Delivery) -> Result<Handled, AppError> {
        loop {
            let loaded = self.app.load_job(job_uuid).await?;
            let now = Utc::now();
            let attempt = match loaded.job.next_step(now) {
                NextStep::Done => return Ok(Handled::Ack),
                // Its holder runs it; if the holder vanished, the lease sweep reschedules it.
                NextStep::Wait(_) if matches!(loaded.job.status, JobStatus::Running { .. }) => return Ok(Handled::Ack),
                NextStep::Wait(at) => {
                    let remaining = (at - now).to_std().unwrap_or_default();
                    if topology::step_for(remaining).is_none() {
                        tokio::time::sleep(remaining).await;
                        continue;
                    }
                    return match publish_delayed(channel, &self.config.prefix, &delivery.data, remaining).await {
                        Ok(()) => Ok(Handled::Ack),
                        Err(error) => Ok(Handled::Requeue(error.to_string())),
                    };
                }
                NextStep::Start(attempt) => attempt,
            };
            let Some(kind) = loaded.job.queued.as_ref().map(|q| q.kind) else { return Ok(Handled::Ack) };
            let limit = self.limits.get(&kind).cloned().expect("every kind has a limit");
            // A kind at its limit does not hold this message (and its prefetch slot)
            // while it waits: the job goes to wait a second in the retry queue, so jobs
            // of other kinds behind it are not held up (a queue full of archives must not
            // stall imports).
            let Ok(_permit) = limit.try_acquire_owned() else {
                let wait = Duration::from_secs(topology::RETRY_STEPS[0]);
                return match publish_delayed(channel, &self.config.prefix, &delivery.data, wait).await {
                    Ok(()) => Ok(Handled::Ack),
                    Err(error) => Ok(Handled::Requeue(error.to_string())),
                };
            };
            let ctx = worker_context(job_uuid, &loaded);
            let lease_until = later(Utc::now(), self.config.lease);
            match self.app.start_job(&ctx, job_uuid, attempt, &self.config.worker_id, lease_until).await {
                Ok(_) => {}
                // Another worker got there first, or the job changed: look again (after a
                // moment: a conflict that does not pass must not spin).
                Err(AppError::Domain(DomainError::Conflict(_))) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(error) if error.is_retryable_conflict() => continue,
                Err(error) => return Err(error),
            }
            tracing::info!(%job_uuid, attempt, kind = kind.as_str(), "job started");
            self.app.metrics.job_started(kind.as_str());
            let started = std::time::Instant::now();
            let outcome = self.run_attempt(&ctx, job_uuid, attempt, &loaded).await?;
            self.app.metrics.job_finished(kind.as_str(), outcome, started.elapsed().as_secs_f64());
            tracing::info!(%job_uuid, attempt, outcome, seconds = started.elapsed().as_secs_f64(), "job attempt ended");
            return Ok(Handled::Ack);
        }
    }

    /// Runs one attempt to its recorded outcome; returns it (for metrics).
    async fn run_attempt(
        &self,
        ctx: &CommandContext,
        job_uuid: Uuid,
        attempt: u32,
        loaded: &LoadedJob,
    ) -> Result<&'static str, AppError> {
        let cancel = CancellationToken::new();
        let (progress, reported) = tokio::sync::watch::channel((0u64, None::<u64>));
        let work = self.work(loaded, &progress, &cancel);
        tokio::pin!(work);
        let ended = {
            // The heartbeat runs beside the work (a slow database never holds the fetch
            // up) and ends only when the attempt is no longer the job's. It is dropped
            // at the end of this block, before anything is recorded: left unpolled in
            // the middle of a renewal, it would hold the job's lock.
            let heartbeat = self.heartbeat(ctx, job_uuid, attempt, reported);
            tokio::pin!(heartbeat);
            tokio::select! {
                outcome = &mut work => Ok(outcome),
                why = &mut heartbeat => Err(why),
                _ = self.stop.cancelled() => Err(Stopped::Shutdown),
            }
        };
        let (outcome, stopped) = match ended {
            Ok(outcome) => (outcome, None),
            Err(why) => {
                cancel.cancel();
                (work.await, Some(why))
            }
        };
        match (outcome, stopped) {
            (Ok(Outcome::Done(result)), None) => match self.app.job_succeeded(ctx, job_uuid, attempt, result).await {
                Ok(()) => Ok("succeeded"),
                Err(AppError::Domain(DomainError::Conflict(_))) => Ok("cancelled"),
                Err(error) => Err(error),
            },
            (Ok(Outcome::Archived(built)), None) => {
                let ttl = self.config.archive_ttl;
                match self.app.archive_succeeded(ctx, job_uuid, attempt, *built, ttl).await {
                    Ok(()) => Ok("succeeded"),
                    // Deleted, cancelled or taken over meanwhile: its bytes went with the
                    // sealed file.
                    Err(AppError::Domain(DomainError::Conflict(_))) => Ok("cancelled"),
                    Err(AppError::Storage(error)) => {
                        let reason = FetchError::passing(format!("storing the archive: {error}"));
                        self.record_failure(ctx, job_uuid, attempt, &reason).await
                    }
                    Err(error) => Err(error),
                }
            }
            (Ok(Outcome::Imported(imported, bytes)), None) => {
                match self.app.import_succeeded(ctx, job_uuid, attempt, *imported, bytes).await {
                    Ok(()) => Ok("succeeded"),
                    Err(AppError::Domain(DomainError::NotFound(_))) => {
                        let reason = "the session was deleted (or registered again) while importing";
                        self.record_failure(ctx, job_uuid, attempt, &FetchError::permanent(reason)).await
                    }
                    // Cancelled (or taken over) meanwhile: nothing of this attempt stays.
                    Err(AppError::Domain(DomainError::Conflict(_))) => Ok("cancelled"),
                    Err(AppError::Storage(error)) => {
                        let reason = FetchError::passing(format!("storing the bytes: {error}"));
                        self.record_failure(ctx, job_uuid, attempt, &reason).await
                    }
                    Err(error) => Err(error),
                }
            }
            // What it fetched (a sealed temporary file) goes with it.
            (_, Some(Stopped::Shutdown)) => self.release(ctx, job_uuid, attempt).await,
            (_, Some(Stopped::Cancelled)) => Ok("cancelled"),
            (_, Some(Stopped::Superseded)) => Ok("superseded"),
            (Err(error), None) => self.record_failure(ctx, job_uuid, attempt, &error).await,
        }
    }

    /// Every second: renews the lease with the progress when it moved (at most once a
    /// second), or every third of the lease anyway; else looks whether the attempt is
    /// still the job's. Returns once it is not (cancelled, or run again elsewhere after
    /// this worker lost its lease). A database that does not answer in time (a third
    /// of the lease for a renewal, a second for a look) counts as no news: the work
    /// goes on, and the lease decides.
    async fn heartbeat(
        &self,
        ctx: &CommandContext,
        job_uuid: Uuid,
        attempt: u32,
        mut reported: tokio::sync::watch::Receiver<(u64, Option<u64>)>,
    ) -> Stopped {
        // The first look is a second in: an `interval`'s first tick is immediate, which
        // cost every attempt a query at its start (and, once its progress had moved, a
        // `JobProgressed` transaction), however short the attempt.
        let second = Duration::from_secs(1);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + second, second);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_beat = std::time::Instant::now();
        loop {
            tick.tick().await;
            let moved = reported.has_changed().unwrap_or(false);
            let due = last_beat.elapsed() >= self.config.lease / 3;
            let state = if moved || due {
                let now_progress = *reported.borrow_and_update();
                last_beat = std::time::Instant::now();
                let lease_until = later(Utc::now(), self.config.lease);
                let renewal = self.app.job_progress(ctx, job_uuid, attempt, now_progress, lease_until);
                match tokio::time::timeout((self.config.lease / 3).max(second), renewal).await {
                    Ok(Ok(_)) => AttemptState::Current,
                    Ok(Err(AppError::Domain(DomainError::Conflict(_)))) => {
                        let state = tokio::time::timeout(second, self.app.attempt_state(job_uuid, attempt)).await;
                        match state {
                            Ok(Ok(AttemptState::Cancelled)) => AttemptState::Cancelled,
                            _ => AttemptState::Superseded,
                        }
                    }
                    Ok(Err(error)) => {
                        tracing::warn!(%job_uuid, %error, "could not renew a job's lease");
                        AttemptState::Current
                    }
                    Err(_) => {
                        tracing::warn!(%job_uuid, "could not renew a job's lease: the database did not answer in time");
                        AttemptState::Current
                    }
                }
            } else {
                match tokio::time::timeout(second, self.app.attempt_state(job_uuid, attempt)).await {
                    Ok(Ok(state)) => state,
                    _ => AttemptState::Current,
                }
            };
            match state {
                AttemptState::Current => {}
                AttemptState::Cancelled => return Stopped::Cancelled,
                AttemptState::Superseded => return Stopped::Superseded,
            }
        }
    }

    /// At shutdown, the attempt is handed back to run again at once, for the next
    /// worker, without using up one of the job's attempts.
    async fn release(&self, ctx: &CommandContext, job_uuid: Uuid, attempt: u32) -> Result<&'static str, AppError> {
        match self.app.release_job(ctx, job_uuid, attempt).await {
            Ok(_) => Ok("released"),
            Err(AppError::Domain(DomainError::Conflict(_))) => Ok("cancelled"),
            Err(error) => Err(error),
        }
    }

    async fn record_failure(
        &self,
        ctx: &CommandContext,
        job_uuid: Uuid,
        attempt: u32,
        error: &FetchError,
    ) -> Result<&'static str, AppError> {
        let retry_at = later(Utc::now(), self.config.backoff.after(attempt));
        match self.app.job_failed(ctx, job_uuid, attempt, &error.message, error.retryable, retry_at).await {
            Ok(job) if matches!(job.status, JobStatus::RetryScheduled { .. }) => Ok("retry"),
            Ok(_) => Ok("failed"),
            // Cancelled (or taken over) meanwhile: nothing to record.
            Err(AppError::Domain(DomainError::Conflict(_))) => Ok("cancelled"),
            Err(error) => Err(error),
        }
    }

    /// The job's work, by kind.
    async fn work(
        &self,
        loaded: &LoadedJob,
        progress: &tokio::sync::watch::Sender<(u64, Option<u64>)>,
        cancel: &CancellationToken,
    ) -> Result<Outcome, FetchError> {
        let queued = loaded.job.queued.as_ref().ok_or_else(|| FetchError::permanent("the job has no request"))?;
        match queued.kind {
            JobKind::ExpireUploads => {
                let ctx = worker_context(queued.job_uuid, loaded);
                let expired = self.app.expire_uploads(&ctx, Utc::now(), cancel).await;
                expired
                    .map(|uploads_expired| Outcome::Done(JobResult::ExpireUploads(ExpiryResult { uploads_expired })))
                    .map_err(|error| FetchError::passing(format!("expiring uploads: {error}")))
            }
            JobKind::Cleanup => {
                let ctx = worker_context(queued.job_uuid, loaded);
                let cleaned = self.app.cleanup(&ctx, &self.config.cleanup, cancel).await;
                cleaned
                    .map(|result| Outcome::Done(JobResult::Cleanup(result)))
                    .map_err(|error| FetchError::passing(format!("cleaning up: {error}")))
            }
            JobKind::PurgeSession => {
                let ctx = worker_context(queued.job_uuid, loaded);
                let id = queued.id_session.ok_or_else(|| FetchError::permanent("the job names no session"))?;
                let purged = self.app.purge_session(&ctx, queued.job_uuid, id, progress, cancel).await;
                purged
                    .map(|assets_deleted| Outcome::Done(JobResult::PurgeSession(PurgeResult { assets_deleted })))
                    .map_err(|error| FetchError::passing(format!("deleting the session's assets: {error}")))
            }
            JobKind::Archive => {
                let archive_uuid =
                    queued.archive_uuid.ok_or_else(|| FetchError::permanent("the job names no archive"))?;
                archive::build(&self.app, archive_uuid, progress, cancel)
                    .await
                    .map(|built| Outcome::Archived(Box::new(built)))
            }
            JobKind::Import => {
                let spec = queued.import.as_ref().ok_or_else(|| FetchError::permanent("the job is not an import"))?;
                match spec.upload_uuid {
                    Some(upload_uuid) => self.import_upload(queued.job_uuid, upload_uuid, spec, progress, cancel).await,
                    None => self.import(loaded, progress, cancel).await,
                }
            }
        }
    }

    /// Turns a received two-phase upload into the asset it is to become, without
    /// copying its bytes: they are read back and hashed (nothing may have changed them
    /// since the PUT, and a `sha256` asked for must match), and the asset keeps them
    /// where they are.
    async fn import_upload(
        &self,
        job_uuid: Uuid,
        upload_uuid: Uuid,
        spec: &crate::domain::job::ImportSpec,
        progress: &tokio::sync::watch::Sender<(u64, Option<u64>)>,
        cancel: &CancellationToken,
    ) -> Result<Outcome, FetchError> {
        use sha2::Digest;
        let upload = match self.app.upload_by_url(upload_uuid).await {
            Ok(upload) => upload,
            Err(AppError::Domain(DomainError::NotFound(_))) => return Err(FetchError::permanent("the upload is gone")),
            Err(error) => return Err(FetchError::passing(format!("reading the upload: {error}"))),
        };
        if upload.status != "importing" || upload.job_uuid != Some(job_uuid) {
            return Err(FetchError::permanent(format!(
                "the upload is {}, not being imported by this job",
                upload.status
            )));
        }
        let (Some(location), Some(size), Some(recorded_sha256)) =
            (upload.blob.clone(), upload.size, upload.sha256.clone())
        else {
            return Err(FetchError::permanent("the upload has no bytes"));
        };
        let size = u64::try_from(size).unwrap_or_default();
        let mut bytes = self.app.blobs.read(&location, 0..size).await.map_err(|error| match error.kind() {
            std::io::ErrorKind::NotFound => FetchError::permanent("the upload's bytes are missing"),
            _ => FetchError::passing(format!("reading the upload's bytes: {error}")),
        })?;
        let mut hasher = sha2::Sha256::new();
        let mut done = 0u64;
        while let Some(chunk) = bytes.next().await {
            if cancel.is_cancelled() {
                return Err(FetchError::passing("stopped"));
            }
            let chunk = chunk.map_err(|error| match error.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::UnexpectedEof => {
                    FetchError::permanent(format!("the upload's bytes cannot be read: {error}"))
                }
                _ => FetchError::passing(format!("reading the upload's bytes: {error}")),
            })?;
            hasher.update(&chunk);
            done += chunk.len() as u64;
            progress.send_replace((done, Some(size)));
        }
        let sha256 = crate::domain::names::Sha256Hex::from_digest(&hasher.finalize());
        if done != size || sha256.as_str() != recorded_sha256 {
            return Err(FetchError::permanent(format!(
                "the upload's bytes changed since they were received ({done} bytes, SHA-256 {})",
                sha256.as_str()
            )));
        }
        if let Some(expected) = spec.sha256.as_ref().filter(|expected| **expected != sha256) {
            return Err(FetchError::permanent(format!(
                "the upload's bytes have SHA-256 {}, not the {} asked for",
                sha256.as_str(),
                expected.as_str()
            )));
        }
        let invalid = |error: crate::domain::names::InvalidValue| FetchError::permanent(error.to_string());
        let filename = crate::domain::names::FileName::parse(&upload.filename).map_err(invalid)?;
        let parse_type = |t: &Option<String>| t.as_deref().and_then(|t| crate::domain::names::MediaType::parse(t).ok());
        let asset_type = spec
            .asset_type
            .clone()
            .or_else(|| parse_type(&upload.mime_type))
            .or_else(|| parse_type(&upload.content_type))
            .unwrap_or_else(|| crate::domain::names::MediaType::guess_from_filename(&filename));
        let asset = crate::domain::asset::AssetUploaded {
            asset_uuid: upload_uuid,
            id_session: crate::domain::names::SessionId::new(upload.id_session).map_err(invalid)?,
            asset_name: spec.asset_name.clone(),
            asset_original_filename: filename,
            asset_type,
            asset_file_size: size,
            asset_sha256: sha256,
            asset_datetime: spec.asset_datetime.or_else(|| crate::domain::names::storable(Utc::now())),
            directory: spec.directory.clone(),
            tags: spec.tags.clone(),
            metadata: spec.metadata.clone(),
            asset_creator: upload.creator,
            asset_source: crate::domain::asset::AssetSource::SignedUpload,
            blob: Some(location),
            id_asset: None,
        };
        let imported = AssetImported { asset, job_uuid, source_url: None, upload_uuid: Some(upload_uuid) };
        Ok(Outcome::Imported(Box::new(imported), None))
    }

    /// Fetches the import's source into a sealed temporary blob (complete, hashed,
    /// durable, under no id yet), checks it, and describes the asset it is to become.
    async fn import(
        &self,
        loaded: &LoadedJob,
        progress: &tokio::sync::watch::Sender<(u64, Option<u64>)>,
        cancel: &CancellationToken,
    ) -> Result<Outcome, FetchError> {
        let queued = loaded.job.queued.as_ref().ok_or_else(|| FetchError::permanent("the job has no request"))?;
        let spec = queued.import.as_ref().ok_or_else(|| FetchError::permanent("the job is not an import"))?;
        let url =
            loaded.url.as_deref().ok_or_else(|| FetchError::permanent("the job's source URL is not on record"))?;
        let url: url::Url = url.parse().map_err(|_| FetchError::permanent("the job's source URL is invalid"))?;
        let mut blob = self.app.blobs.create_temp(crate::domain::job::asset_uuid_of(queued.job_uuid));
        let fetched = self.config.fetcher.fetch(&url, &mut blob, progress, cancel).await?;
        let stored = blob.seal().await.map_err(|e| FetchError::passing(format!("storing the bytes: {e}")))?;
        if let Some(expected) = spec.sha256.as_ref().filter(|expected| **expected != stored.sha256) {
            return Err(FetchError::permanent(format!(
                "the fetched bytes have SHA-256 {}, not the {} asked for",
                stored.sha256.as_str(),
                expected.as_str()
            )));
        }
        let imported = loaded
            .imported_asset(&stored, fetched.file_name.as_deref(), fetched.content_type.as_deref())
            .map_err(FetchError::permanent)?;
        Ok(Outcome::Imported(Box::new(imported), Some(stored)))
    }
}

/// What an attempt's work made.
enum Outcome {
    /// An import's asset, and its bytes to place (none for an upload's: they stay).
    Imported(Box<AssetImported>, Option<SealedBlob>),
    /// An archive's zip, to record and place.
    Archived(Box<ArchiveBuilt>),
    /// Work that is done once it ran (expiry, cleanup, purge): what it did.
    Done(JobResult),
}

/// Why a running attempt was stopped before its work ended.
#[derive(Debug, Clone, Copy)]
enum Stopped {
    /// The worker is stopping: the attempt is handed back.
    Shutdown,
    /// The job was cancelled: the attempt leaves.
    Cancelled,
    /// Run again elsewhere after this worker lost its lease: the attempt leaves.
    Superseded,
}

/// Sends a job's message (as received) to wait `delay` in the retry queues: the
/// largest step that fits; it comes back to `<prefix>.jobs` and, if more is left, goes
/// on to the next step.
async fn publish_delayed(
    channel: &lapin::Channel,
    prefix: &str,
    body: &[u8],
    delay: Duration,
) -> Result<(), BrokerError> {
    let step = topology::step_for(delay).unwrap_or(topology::RETRY_STEPS[0]);
    publish_to_queue(channel, &topology::retry_queue(prefix, step), body).await
}

/// Publishes a job message (persistent) straight to `queue` and waits for the confirm.
async fn publish_to_queue(channel: &lapin::Channel, queue: &str, body: &[u8]) -> Result<(), BrokerError> {
    let properties = BasicProperties::default().with_content_type("application/json".into()).with_delivery_mode(2);
    let confirm =
        channel.basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body, properties).await?.await?;
    if !confirm.is_ack() {
        return Err(BrokerError::Unavailable(format!("the broker refused a job message for {queue}")));
    }
    Ok(())
}

/// The job scheduler: a subscriber of the global log (one leader across processes)
/// that sends each `JobRetryScheduled` to the retry queues, so a retry is never lost
/// between the database and the broker; and, when idle, sweeps running jobs whose
/// worker's lease ended (the worker died without the broker noticing, or lost the
/// database) and schedules their next attempt.
pub async fn run_scheduler(app: App, config: SchedulerConfig, flush: CancellationToken) {
    let subscription = Subscription {
        checkpoint: "job-scheduler",
        leader_lock: 0x6173_7365_7464_0002,
        database_url: config.database_url.clone(),
        idle_poll: Duration::from_millis(200),
    };
    let scheduler =
        Scheduler { app, config, channel: None, last_sweep: std::time::Instant::now(), leader_since: Utc::now() };
    subscriber::run(subscription, scheduler, flush).await
}

#[derive(Clone)]
pub struct SchedulerConfig {
    pub broker: Broker,
    pub prefix: String,
    pub database_url: String,
    pub backoff: Backoff,
    /// How often leases are checked.
    pub sweep_every: Duration,
    /// How often a cleanup is queued; none: never.
    pub cleanup_every: Option<Duration>,
    /// The attempts of the jobs the scheduler queues.
    pub job_policy: JobPolicy,
}

struct Scheduler {
    app: App,
    config: SchedulerConfig,
    channel: Option<crate::broker::PooledChannel>,
    last_sweep: std::time::Instant,
    /// When this process became the leader (the first cleanup's reference).
    leader_since: chrono::DateTime<Utc>,
}

fn broker_error(error: impl std::fmt::Display) -> SubscriberError {
    SubscriberError::Handler(format!("broker: {error}"))
}

#[async_trait::async_trait]
impl LogHandler for Scheduler {
    async fn begin_term(&mut self) -> Result<(), SubscriberError> {
        self.channel = None;
        self.leader_since = Utc::now();
        let channel = self.config.broker.channel().await.map_err(broker_error)?;
        topology::declare(&channel, &self.config.prefix).await.map_err(broker_error)?;
        self.channel = Some(channel);
        Ok(())
    }

    async fn handle(&mut self, events: &[RecordedEvent]) -> Result<(), PartlyHandled> {
        for (index, event) in events.iter().enumerate() {
            if event.event_type != "JobRetryScheduled" {
                continue;
            }
            let partly = |error| PartlyHandled { handled: index, error };
            let at =
                event.data.get("at").and_then(|at| serde_json::from_value::<chrono::DateTime<Utc>>(at.clone()).ok());
            let delay = at.map(|at| (at - Utc::now()).to_std().unwrap_or_default()).unwrap_or_default();
            let channel = self.channel.as_ref().ok_or_else(|| partly(broker_error("no channel")))?;
            let body = crate::relay::envelope(event);
            let sent = match topology::step_for(delay) {
                Some(_) => publish_delayed(channel, &self.config.prefix, &body, delay).await,
                // Due now (a lost worker's job, a shutdown): straight to the job queue.
                None => publish_now(channel, &self.config.prefix, &body).await,
            };
            sent.map_err(|error| partly(broker_error(error)))?;
        }
        // A log that is never idle must not starve the sweep.
        self.sweep_if_due().await;
        Ok(())
    }

    async fn idle(&mut self) -> Result<(), SubscriberError> {
        if !self.channel.as_ref().is_some_and(|channel| channel.usable()) {
            return Err(broker_error("the broker connection was lost"));
        }
        self.sweep_if_due().await;
        Ok(())
    }
}

impl Scheduler {
    async fn sweep_if_due(&mut self) {
        if self.last_sweep.elapsed() >= self.config.sweep_every {
            self.last_sweep = std::time::Instant::now();
            self.sweep_leases().await;
            self.queue_cleanup_if_due().await;
        }
    }

    /// Queues a cleanup when the last one is older than the interval and none is
    /// unfinished (read from the jobs: a new leader keeps the rhythm).
    async fn queue_cleanup_if_due(&self) {
        let Some(every) = self.config.cleanup_every else { return };
        match self.app.cleanup_due(every, self.leader_since).await {
            Ok(false) => {}
            Ok(true) => {
                let ctx = CommandContext {
                    actor: Actor { kind: PrincipalKind::Service, uuid: Uuid::nil() },
                    request_id: format!("scheduler-{}", Uuid::new_v4()),
                    correlation_id: format!("cleanup-{}", Uuid::new_v4()),
                    message: None,
                };
                match self.app.request_cleanup(&ctx, self.config.job_policy).await {
                    Ok(job_uuid) => tracing::info!(%job_uuid, "cleanup queued"),
                    Err(error) => tracing::warn!(%error, "could not queue a cleanup"),
                }
            }
            Err(error) => tracing::warn!(%error, "could not tell whether a cleanup is due"),
        }
    }

    async fn sweep_leases(&self) {
        let expired = match self.app.pool.get().await {
            Ok(client) => crate::projections::read::jobs_with_expired_leases(&client, Utc::now()).await,
            Err(error) => {
                tracing::warn!(%error, "lease sweep: database unavailable");
                return;
            }
        };
        for job_uuid in expired.unwrap_or_default() {
            let ctx = CommandContext {
                actor: Actor { kind: PrincipalKind::Service, uuid: Uuid::nil() },
                request_id: job_uuid.to_string(),
                correlation_id: job_uuid.to_string(),
                message: None,
            };
            match self.app.expire_job_lease(&ctx, job_uuid, Utc::now()).await {
                Ok(_) => tracing::warn!(%job_uuid, "a job's worker stopped reporting; its next attempt is scheduled"),
                Err(error) => tracing::warn!(%job_uuid, %error, "lease sweep: could not reschedule a job"),
            }
        }
    }
}

async fn publish_now(channel: &lapin::Channel, prefix: &str, body: &[u8]) -> Result<(), BrokerError> {
    publish_to_queue(channel, &topology::jobs_queue(prefix), body).await
}

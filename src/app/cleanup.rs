//! Keeping storage clean (EVENTS.md "Jobs"): the cleanup job, which the scheduler
//! queues on an interval, and the purge of a deleted session's assets.
//!
//! The cleanup expires what is past its time (archives, two-phase uploads: events,
//! then their bytes go), removes orphan blobs (bytes nothing visible refers to, older
//! than a grace period: left by a crash between persisting and recording, or by a
//! removal that failed after a delete), stale temporary files and old command receipts.
//! Nothing a live asset, an archive being built or kept, or an upload holding bytes
//! refers to is ever removed. Removals go in small batches with pauses: mass deletions
//! slow ext4 file creation for minutes (BENCHMARKS.md), and uploads must not notice.

use std::time::{Duration, SystemTime};

use chrono::Utc;
use uuid::Uuid;

use super::jobs::{job_stream, JobPolicy};
use super::{stage, stage_unlocked, App, AppError, CommandContext};
use crate::blobs::BlobBackend;
use crate::domain::asset::{Asset, AssetCommand, DeletionReason};
use crate::domain::job::{CleanupResult, Job, JobCommand, JobKind, JobQueued};
use crate::domain::names::SessionId;
use crate::projections::read;

/// What the cleanup keeps and for how long.
#[derive(Debug, Clone, Copy)]
pub struct CleanupPolicy {
    /// A blob nothing refers to is removed once it is older than this (bytes being
    /// recorded right now are younger).
    pub orphan_grace: Duration,
    /// Receipts of AMQP commands older than this go (a message redelivered later would
    /// run again).
    pub receipt_max_age: Duration,
    /// Removals per batch, and the pause after each.
    pub batch: usize,
    pub pause: Duration,
}

impl Default for CleanupPolicy {
    fn default() -> Self {
        Self {
            orphan_grace: Duration::from_secs(3600),
            receipt_max_age: Duration::from_secs(30 * 86400),
            batch: 100,
            pause: Duration::from_millis(50),
        }
    }
}

/// Assets deleted per transaction by a purge, and the pause after each batch.
const PURGE_BATCH: i64 = 500;
const PURGE_PAUSE: Duration = Duration::from_millis(20);

/// Attempts of a purge queued again by the cleanup.
pub const PURGE_ATTEMPTS: u32 = 10;

impl App {
    /// Queues a cleanup (a job of kind `cleanup`, on no session).
    pub async fn request_cleanup(&self, ctx: &CommandContext, policy: JobPolicy) -> Result<Uuid, AppError> {
        let job_uuid = Uuid::new_v4();
        let queued = JobQueued {
            job_uuid,
            kind: JobKind::Cleanup,
            id_session: None,
            requested_by: ctx.actor,
            max_attempts: policy.max_attempts.max(1),
            import: None,
            archive_uuid: None,
        };
        in_transaction!(self, |tx| {
            stage::<Job>(&tx, ctx, &job_stream(job_uuid), JobCommand::Queue(Box::new(queued.clone()))).await?;
            Ok(())
        })?;
        Ok(job_uuid)
    }

    /// Whether a cleanup is due: none is unfinished and the last one was queued at
    /// least `interval` ago (or, if there never was one, `since` is that old: the first
    /// waits an interval after the scheduler started, not at every start). The
    /// scheduler's leader asks; the answer comes from the jobs themselves, so a new
    /// leader (another process) keeps the same rhythm.
    pub async fn cleanup_due(&self, interval: Duration, since: chrono::DateTime<Utc>) -> Result<bool, AppError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE status IN ('queued', 'running', 'retry_scheduled')),
                        extract(epoch FROM now() - coalesce(max(created_at), $1))::float8
                 FROM jobs WHERE kind = 'cleanup'",
                &[&since],
            )
            .await?;
        let (unfinished, age): (i64, f64) = (row.try_get(0)?, row.try_get(1)?);
        Ok(unfinished == 0 && age >= interval.as_secs_f64())
    }

    /// One cleanup pass; stops between two removals once `stop` is cancelled (what is
    /// left, the next pass does).
    pub async fn cleanup(
        &self,
        ctx: &CommandContext,
        policy: &CleanupPolicy,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<CleanupResult, AppError> {
        let now = Utc::now();
        // Each step on its own: one that fails (a listing the bucket refuses, say) does
        // not keep the others from running; the job then fails, and is retried.
        let mut failed = None;
        let mut step = |name: &str, outcome: Result<u64, AppError>| match outcome {
            Ok(count) => count,
            Err(error) => {
                tracing::warn!(step = name, %error, "a cleanup step failed");
                failed.get_or_insert(error);
                0
            }
        };
        let mut result = CleanupResult {
            archives_expired: step("archives", self.expire_archives(ctx, now, stop).await),
            uploads_expired: step("uploads", self.expire_uploads(ctx, now, stop).await),
            ..CleanupResult::default()
        };
        step("purges", self.queue_missing_purges(ctx, stop).await);
        let temp_files = self.blobs.remove_orphan_temp_files().await.map(|n| n as u64).map_err(AppError::from);
        result.temp_files_removed = step("temp files", temp_files);
        result.orphan_blobs_removed = step("orphan blobs", self.remove_orphan_blobs(policy, stop).await);
        result.command_receipts_removed = step("receipts", self.remove_old_receipts(policy, stop).await);
        if let Some(error) = failed {
            return Err(error);
        }
        tracing::info!(
            archives_expired = result.archives_expired,
            uploads_expired = result.uploads_expired,
            temp_files_removed = result.temp_files_removed,
            orphan_blobs_removed = result.orphan_blobs_removed,
            command_receipts_removed = result.command_receipts_removed,
            "cleanup done"
        );
        Ok(result)
    }

    /// Removes the blobs, on every configured backend, that nothing visible refers to
    /// and that are older than the grace period. Returns how many went.
    pub async fn remove_orphan_blobs(
        &self,
        policy: &CleanupPolicy,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<u64, AppError> {
        use futures::StreamExt;
        let cutoff = SystemTime::now().checked_sub(policy.orphan_grace).unwrap_or(SystemTime::UNIX_EPOCH);
        let batch_size = policy.batch.max(1);
        let mut removed = 0;
        let sweep_started = Utc::now();
        for backend in self.blobs.backends() {
            let mut listing = backend.list();
            let mut batch = Vec::with_capacity(batch_size);
            loop {
                if stop.is_cancelled() {
                    return Ok(removed);
                }
                let next = listing.next().await.transpose()?;
                if let Some(stat) = &next {
                    if stat.modified <= cutoff {
                        batch.push(stat.key.clone());
                    }
                }
                if batch.len() >= batch_size || (next.is_none() && !batch.is_empty()) {
                    let keys = std::mem::take(&mut batch);
                    removed += self.remove_unreferenced(backend, &keys, cutoff, policy.orphan_grace).await?;
                    tokio::time::sleep(policy.pause).await;
                }
                if next.is_none() {
                    break;
                }
            }
        }
        if !stop.is_cancelled() {
            // Candidates this complete sweep neither removed nor saw again young: gone, or
            // referred to since.
            let client = self.pool.get().await?;
            let grace = policy.orphan_grace.as_secs_f64();
            client
                .execute(
                    "DELETE FROM orphan_candidates WHERE seen_at < $1::timestamptz - make_interval(secs => $2)",
                    &[&sweep_started, &grace],
                )
                .await?;
        }
        Ok(removed)
    }

    async fn remove_unreferenced(
        &self,
        backend: &dyn BlobBackend,
        keys: &[String],
        cutoff: SystemTime,
        grace: Duration,
    ) -> Result<u64, AppError> {
        let (orphans, importing) = {
            let client = self.pool.get().await?;
            let orphans = read::unreferenced_blob_keys(&client, keys).await?;
            // The keys unfinished imports write under (their asset's id derives from the
            // job): a retried attempt may be about to place its bytes there.
            let jobs = client
                .query(
                    "SELECT job_uuid FROM jobs WHERE kind = 'import' AND status IN ('queued', 'running', 'retry_scheduled')",
                    &[],
                )
                .await?;
            let importing: std::collections::HashSet<String> =
                jobs.iter().map(|row| crate::blobs::key_for(crate::domain::job::asset_uuid_of(row.get(0)))).collect();
            (orphans, importing)
        };
        let orphans: Vec<String> = orphans.into_iter().filter(|key| !importing.contains(key)).collect();
        // Two sightings, the grace apart: the first marks a candidate, a later one removes
        // it (see the `orphan_candidates` table).
        let confirmed: Vec<String> = {
            let client = self.pool.get().await?;
            let kind = backend.kind().as_str();
            let grace = grace.as_secs_f64();
            let confirmed = client
                .query(
                    "SELECT key FROM orphan_candidates WHERE backend = $1 AND key = ANY($2)
                     AND seen_at <= now() - make_interval(secs => $3)",
                    &[&kind, &orphans, &grace],
                )
                .await?
                .iter()
                .map(|row| row.get(0))
                .collect();
            client
                .execute(
                    "INSERT INTO orphan_candidates (backend, key) SELECT $1, unnest($2::text[])
                     ON CONFLICT (backend, key) DO NOTHING",
                    &[&kind, &orphans],
                )
                .await?;
            confirmed
        };
        let mut removed = 0;
        for key in confirmed {
            match backend.remove_if_older(&key, cutoff).await {
                Ok(true) => {
                    removed += 1;
                    tracing::info!(key, backend = backend.kind().as_str(), "removed an orphan blob");
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(key, %error, "could not remove an orphan blob; the next cleanup will");
                    continue;
                }
            }
            let client = self.pool.get().await?;
            client
                .execute(
                    "DELETE FROM orphan_candidates WHERE backend = $1 AND key = $2",
                    &[&backend.kind().as_str(), &key],
                )
                .await?;
        }
        Ok(removed)
    }

    /// Removes receipts of AMQP commands older than the policy's age, in batches.
    async fn remove_old_receipts(
        &self,
        policy: &CleanupPolicy,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<u64, AppError> {
        // At least an hour: a receipt must outlive any redelivery of its message.
        let age_seconds = policy.receipt_max_age.as_secs().max(3600) as f64;
        let limit = i64::try_from(policy.batch.max(1) * 10).unwrap_or(1000);
        let mut removed = 0;
        while !stop.is_cancelled() {
            let client = self.pool.get().await?;
            // The database's clock, which wrote `received_at`.
            let gone = client
                .execute(
                    "DELETE FROM command_receipts WHERE message_id IN
                         (SELECT message_id FROM command_receipts
                          WHERE received_at < now() - make_interval(secs => $1) LIMIT $2)",
                    &[&age_seconds, &limit],
                )
                .await?;
            removed += gone;
            if gone < limit as u64 {
                break;
            }
        }
        Ok(removed)
    }

    /// The purge job of a deleted session: deletes (`AssetDeleted`, reason
    /// `session_deleted`) the live assets created before the job was queued, a batch per
    /// transaction, removing each batch's bytes after its commit. Reports `(done, total)`
    /// through `progress`. Returns how many it deleted. Stops between batches once `stop`
    /// is cancelled; run again, it goes on where it stopped.
    pub async fn purge_session(
        &self,
        ctx: &CommandContext,
        job_uuid: Uuid,
        id: SessionId,
        progress: &tokio::sync::watch::Sender<(u64, Option<u64>)>,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<u64, AppError> {
        let queued_at: i64 = {
            let client = self.pool.get().await?;
            client
                .query_opt("SELECT created_position FROM jobs WHERE job_uuid = $1", &[&job_uuid])
                .await?
                .map(|row| row.try_get(0))
                .transpose()?
                .ok_or(crate::domain::DomainError::NotFound("job"))?
        };
        let total: i64 = {
            let client = self.pool.get().await?;
            client
                .query_one(
                    "SELECT count(*) FROM assets WHERE id_session = $1 AND asset_status = 'available'
                     AND created_position < $2",
                    &[&id.get(), &queued_at],
                )
                .await?
                .try_get(0)?
        };
        let total = u64::try_from(total).unwrap_or_default();
        let mut deleted = 0u64;
        progress.send_replace((0, Some(total)));
        while !stop.is_cancelled() {
            let batch = in_transaction!(self, |tx| {
                let batch = read::live_assets_before(&tx, id, queued_at, PURGE_BATCH).await?;
                for (uuid, _) in &batch {
                    let delete = AssetCommand::Delete(DeletionReason::SessionDeleted);
                    stage_unlocked::<Asset>(&tx, ctx, &super::asset_stream(*uuid), delete).await?;
                }
                Ok(batch)
            })?;
            if batch.is_empty() {
                break;
            }
            for (uuid, _) in &batch {
                self.read_cache.forget_asset(*uuid);
            }
            for (_, location) in &batch {
                self.remove_blob(location).await;
            }
            deleted += batch.len() as u64;
            progress.send_replace((deleted, Some(total.max(deleted))));
            // A pause between batches: mass deletions slow ext4 file creation.
            tokio::time::sleep(PURGE_PAUSE).await;
        }
        Ok(deleted)
    }

    /// Queues a purge for each session whose deleted registration still has live assets
    /// and no unfinished purge (one that failed for good, or was cancelled): a deleted
    /// session's assets always go in the end. Returns how many it queued.
    async fn queue_missing_purges(
        &self,
        ctx: &CommandContext,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<u64, AppError> {
        let sessions: Vec<i64> = {
            let client = self.pool.get().await?;
            client
                .query(
                    "SELECT DISTINCT a.id_session FROM assets a
                     LEFT JOIN sessions s ON s.id_session = a.id_session
                     WHERE a.asset_status = 'available'
                       AND (s.id_session IS NULL OR a.created_position < s.registered_position)
                       AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.kind = 'purge_session'
                                       AND j.id_session = a.id_session
                                       AND j.status IN ('queued', 'running', 'retry_scheduled'))
                     LIMIT 100",
                    &[],
                )
                .await?
                .iter()
                .map(|row| row.get(0))
                .collect()
        };
        let mut queued = 0;
        for id in sessions {
            if stop.is_cancelled() {
                break;
            }
            let Ok(id) = SessionId::new(id) else { continue };
            let job_uuid = Uuid::new_v4();
            let purge = JobQueued {
                job_uuid,
                kind: JobKind::PurgeSession,
                id_session: Some(id),
                requested_by: ctx.actor,
                max_attempts: PURGE_ATTEMPTS,
                import: None,
                archive_uuid: None,
            };
            in_transaction!(self, |tx| {
                stage::<Job>(&tx, ctx, &job_stream(job_uuid), JobCommand::Queue(Box::new(purge.clone()))).await?;
                Ok(())
            })?;
            tracing::warn!(id_session = id.get(), %job_uuid, "a deleted session still had assets: purge queued again");
            queued += 1;
        }
        Ok(queued)
    }
}

//! The `jobs` read model. One pure fold ([`JobRow::apply`]) serves both the online
//! projection (read the row, fold the event, write it back: jobs see few events) and
//! the replay (folded in memory), so the two cannot drift apart.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::types::{ToSql, Type};

use super::ProjectionError;
use crate::domain::job::JobEvent;
use crate::domain::names::SessionId;
use crate::eventstore::RecordedEvent;

/// A `jobs` row (columns in table order).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct JobRow {
    pub job_uuid: uuid::Uuid,
    kind: String,
    id_session: Option<i64>,
    status: &'static str,
    attempts: i32,
    max_attempts: i32,
    progress_done: i64,
    progress_total: Option<i64>,
    result: Option<serde_json::Value>,
    error: Option<String>,
    requested_by_kind: String,
    requested_by_uuid: uuid::Uuid,
    source_url: Option<String>,
    lease_until: Option<DateTime<Utc>>,
    next_attempt_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    version: i64,
    created_position: i64,
}

/// A size as the table keeps it (bigint); no file comes near the end of it.
pub(super) fn signed(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl JobRow {
    /// The row after `event` (`None` before the job's first event).
    pub fn apply(row: Option<Self>, recorded: &RecordedEvent, event: &JobEvent) -> Option<Self> {
        let mut row = match (row, event) {
            (_, JobEvent::JobQueued(q)) => JobRow {
                job_uuid: q.job_uuid,
                kind: q.kind.as_str().to_owned(),
                id_session: q.id_session.map(SessionId::get),
                status: "queued",
                attempts: 0,
                max_attempts: i32::try_from(q.max_attempts).unwrap_or(i32::MAX),
                progress_done: 0,
                progress_total: None,
                result: None,
                error: None,
                requested_by_kind: q.requested_by.kind.as_str().to_owned(),
                requested_by_uuid: q.requested_by.uuid,
                source_url: q.import.as_ref().and_then(|i| i.source_url.clone()),
                lease_until: None,
                next_attempt_at: None,
                created_at: recorded.recorded_at,
                updated_at: recorded.recorded_at,
                version: recorded.version,
                created_position: recorded.position,
            },
            (None, _) => return None,
            (Some(mut row), event) => {
                match event {
                    JobEvent::JobQueued(_) => unreachable!("matched above"),
                    JobEvent::JobStarted(s) => {
                        row.status = "running";
                        row.attempts = i32::try_from(s.attempt).unwrap_or(i32::MAX);
                        row.lease_until = Some(s.lease_until);
                        row.next_attempt_at = None;
                        row.progress_done = 0;
                        row.progress_total = None;
                    }
                    JobEvent::JobProgressed(p) => {
                        row.progress_done = signed(p.done);
                        row.progress_total = p.total.map(signed);
                        row.lease_until = Some(p.lease_until);
                    }
                    JobEvent::JobSucceeded(s) => {
                        row.status = "succeeded";
                        row.error = None;
                        // Done is done, even when it finished before its first report.
                        row.progress_done = signed(s.result.done());
                        row.progress_total = Some(signed(s.result.done()));
                        row.result = serde_json::to_value(&s.result).ok();
                        row.lease_until = None;
                    }
                    JobEvent::JobFailed(f) => {
                        row.status = "failed";
                        row.error = Some(f.error.clone());
                        row.lease_until = None;
                    }
                    JobEvent::JobRetryScheduled(r) => {
                        row.status = "retry_scheduled";
                        row.error = Some(r.error.clone());
                        row.lease_until = None;
                        row.next_attempt_at = Some(r.at);
                    }
                    JobEvent::JobCancelled(_) => {
                        row.status = "cancelled";
                        row.lease_until = None;
                        row.next_attempt_at = None;
                    }
                }
                row
            }
        };
        row.updated_at = recorded.recorded_at;
        row.version = recorded.version;
        Some(row)
    }

    pub const COLUMNS: &'static str = "job_uuid, kind, id_session, status, attempts, max_attempts, progress_done, \
        progress_total, result, error, requested_by_kind, requested_by_uuid, source_url, lease_until, \
        next_attempt_at, created_at, updated_at, version, created_position";
    pub const TYPES: [Type; 19] = [
        Type::UUID,
        Type::TEXT,
        Type::INT8,
        Type::TEXT,
        Type::INT4,
        Type::INT4,
        Type::INT8,
        Type::INT8,
        Type::JSONB,
        Type::TEXT,
        Type::TEXT,
        Type::UUID,
        Type::TEXT,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::INT8,
        Type::INT8,
    ];

    pub fn values(&self) -> [&(dyn ToSql + Sync); 19] {
        [
            &self.job_uuid,
            &self.kind,
            &self.id_session,
            &self.status,
            &self.attempts,
            &self.max_attempts,
            &self.progress_done,
            &self.progress_total,
            &self.result,
            &self.error,
            &self.requested_by_kind,
            &self.requested_by_uuid,
            &self.source_url,
            &self.lease_until,
            &self.next_attempt_at,
            &self.created_at,
            &self.updated_at,
            &self.version,
            &self.created_position,
        ]
    }

    fn from_row(row: &tokio_postgres::Row) -> Result<Self, tokio_postgres::Error> {
        let status: String = row.try_get(3)?;
        Ok(Self {
            job_uuid: row.try_get(0)?,
            kind: row.try_get(1)?,
            id_session: row.try_get(2)?,
            status: STATUSES.iter().find(|s| **s == status).copied().unwrap_or("failed"),
            attempts: row.try_get(4)?,
            max_attempts: row.try_get(5)?,
            progress_done: row.try_get(6)?,
            progress_total: row.try_get(7)?,
            result: row.try_get(8)?,
            error: row.try_get(9)?,
            requested_by_kind: row.try_get(10)?,
            requested_by_uuid: row.try_get(11)?,
            source_url: row.try_get(12)?,
            lease_until: row.try_get(13)?,
            next_attempt_at: row.try_get(14)?,
            created_at: row.try_get(15)?,
            updated_at: row.try_get(16)?,
            version: row.try_get(17)?,
            created_position: row.try_get(18)?,
        })
    }
}

const STATUSES: [&str; 6] = ["queued", "running", "retry_scheduled", "succeeded", "failed", "cancelled"];

/// Online projection of one job event.
pub(super) async fn apply(
    client: &impl GenericClient,
    recorded: &RecordedEvent,
    event: &JobEvent,
) -> Result<(), ProjectionError> {
    let select = client.prepare_cached(&format!("SELECT {} FROM jobs WHERE job_uuid = $1", JobRow::COLUMNS)).await?;
    let job_uuid = job_uuid(event);
    let current = match client.query_opt(&select, &[&job_uuid]).await? {
        Some(row) => Some(JobRow::from_row(&row)?),
        None => None,
    };
    let Some(row) = JobRow::apply(current, recorded, event) else { return Ok(()) };
    let upsert = client
        .prepare_cached(&format!(
            "INSERT INTO jobs ({}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)
             ON CONFLICT (job_uuid) DO UPDATE SET status = $4, attempts = $5, progress_done = $7, progress_total = $8,
                 result = $9, error = $10, lease_until = $14, next_attempt_at = $15, updated_at = $17, version = $18",
            JobRow::COLUMNS
        ))
        .await?;
    client.execute(&upsert, &row.values()).await?;
    Ok(())
}

pub(super) fn job_uuid(event: &JobEvent) -> uuid::Uuid {
    match event {
        JobEvent::JobQueued(e) => e.job_uuid,
        JobEvent::JobStarted(e) => e.job_uuid,
        JobEvent::JobProgressed(e) => e.job_uuid,
        JobEvent::JobSucceeded(e) => e.job_uuid,
        JobEvent::JobFailed(e) => e.job_uuid,
        JobEvent::JobRetryScheduled(e) => e.job_uuid,
        JobEvent::JobCancelled(e) => e.job_uuid,
    }
}

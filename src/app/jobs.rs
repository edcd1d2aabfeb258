//! Jobs in the application layer: what the HTTP and AMQP edges share to request an
//! import, read and cancel jobs, and the commands a worker runs on a job's stream
//! (start, progress, succeed, fail, lease expiry). Every change is an event appended
//! with the expected version, like every other command.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use uuid::Uuid;

use super::{receive_once, stage, stage_unlocked, App, AppError, CommandContext};
use crate::domain::asset::{Asset, AssetCommand, AssetImported};
use crate::domain::job::{ImportSpec, Job, JobCommand, JobEvent, JobKind, JobQueued, JobResult};
use crate::domain::names::{
    check_storable_json, AssetName, Directory, InvalidValue, MediaType, SessionId, Sha256Hex, Tags,
};
use crate::domain::principal::{Actor, Principal, PrincipalKind};
use crate::domain::DomainError;
use crate::eventstore;
use crate::projections::read::{self, JobInfo};

/// Longest import URL accepted.
pub const MAX_URL_BYTES: usize = 8 * 1024;

pub fn job_stream(uuid: Uuid) -> String {
    <Job as crate::domain::Aggregate>::stream(uuid)
}

/// The body of `POST /imports` and of the AMQP command `import.request`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
pub struct ImportBody {
    #[schema(value_type = crate::http::fields::SessionId)]
    #[serde(deserialize_with = "integral")]
    pub id_session: i64,
    /// http or https; reachable public addresses only, unless allow-listed.
    #[schema(value_type = crate::http::fields::ImportUrl)]
    pub url: String,
    #[schema(value_type = crate::http::fields::AssetName)]
    pub asset_name: String,
    /// MIME type; else the source's Content-Type, else guessed from the name.
    #[schema(value_type = Option<crate::http::fields::MediaType>)]
    pub asset_type: Option<String>,
    /// The SHA-256 the bytes must have (hex); checked after the fetch.
    #[schema(value_type = Option<String>, pattern = "^[0-9a-fA-F]{64}$")]
    pub sha256: Option<String>,
    #[schema(value_type = Option<crate::http::fields::Directory>)]
    pub directory: Option<String>,
    #[schema(value_type = Option<crate::http::fields::Tags>)]
    pub tags: Option<Vec<String>>,
    #[schema(value_type = Option<crate::http::fields::Metadata>)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// Services name the creator with exactly one of these four (as for uploads).
    #[schema(value_type = Option<crate::http::fields::UuidText>)]
    pub id_user: Option<Uuid>,
    #[schema(value_type = Option<crate::http::fields::UuidText>)]
    pub id_participant: Option<Uuid>,
    #[schema(value_type = Option<crate::http::fields::UuidText>)]
    pub id_device: Option<Uuid>,
    #[schema(value_type = Option<crate::http::fields::UuidText>)]
    pub id_service: Option<Uuid>,
}

/// An integer, also when written as a number with a zero fraction (`12.0`): JSON Schema's
/// `integer`, which the documents promise.
fn integral<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    let number = serde_json::Number::deserialize(deserializer)?;
    if let Some(integer) = number.as_i64() {
        return Ok(integer);
    }
    match number.as_f64() {
        Some(float) if float.fract() == 0.0 && float >= i64::MIN as f64 && float < i64::MAX as f64 => Ok(float as i64),
        _ => Err(serde::de::Error::custom(format!("{number} is not an integer in range"))),
    }
}

/// An import as validated: what `JobQueued` will say, and the full URL (kept out of
/// the event log: see the `job_inputs` table).
#[derive(Debug, Clone)]
pub struct ImportRequest {
    pub id_session: SessionId,
    pub url: reqwest::Url,
    pub spec: ImportSpec,
}

/// The creator of what `principal` makes: services name one of four kinds, exactly one;
/// anyone else is the creator (what they name is ignored, as OpenTera does).
pub fn creator_named(principal: &Principal, named: [Option<Uuid>; 4]) -> Result<Actor, InvalidValue> {
    if !principal.is_service() {
        return Ok(principal.actor());
    }
    let kinds = [PrincipalKind::User, PrincipalKind::Participant, PrincipalKind::Device, PrincipalKind::Service];
    let named: Vec<Actor> =
        kinds.into_iter().zip(named).filter_map(|(kind, uuid)| uuid.map(|uuid| Actor { kind, uuid })).collect();
    match named[..] {
        [creator] => Ok(creator),
        _ => Err(InvalidValue::new(
            "creator",
            "services must name the creator with exactly one of id_user, id_participant, id_device, id_service",
        )),
    }
}

impl ImportBody {
    pub fn validate(self, principal: &Principal) -> Result<ImportRequest, InvalidValue> {
        let id_session = SessionId::new(self.id_session)?;
        if self.url.len() > MAX_URL_BYTES {
            return Err(InvalidValue::new("url", format!("at most {MAX_URL_BYTES} bytes")));
        }
        let url: reqwest::Url =
            self.url.trim().parse().map_err(|error| InvalidValue::new("url", format!("not a URL: {error}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
            return Err(InvalidValue::new("url", "must be an http or https URL with a host"));
        }
        let asset_name = AssetName::parse(&self.asset_name)?;
        let asset_type = self
            .asset_type
            .as_deref()
            .map(|given| crate::http::fields::check_media_type(given).and_then(|()| MediaType::parse(given)))
            .transpose()?;
        let sha256 = self.sha256.as_deref().map(|s| Sha256Hex::parse(&s.to_ascii_lowercase())).transpose()?;
        let metadata = self.metadata.unwrap_or_default();
        check_storable_json("metadata", &serde_json::Value::Object(metadata.clone()))?;
        let directory = match self.directory.as_deref() {
            Some(dir) => Directory::parse(dir)?,
            None => Directory::root(),
        };
        let tags = Tags::parse(self.tags.unwrap_or_default())?;
        let asset_creator =
            creator_named(principal, [self.id_user, self.id_participant, self.id_device, self.id_service])?;
        let spec = ImportSpec {
            source_url: crate::jobs::fetch::redacted(&url),
            asset_name,
            asset_type,
            sha256,
            directory,
            tags,
            metadata,
            asset_creator,
        };
        Ok(ImportRequest { id_session, url, spec })
    }
}

/// A client's `Idempotency-Key` and what it was sent with.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    pub key: String,
    /// Of the body, written one way whatever its key order and spacing.
    pub body_sha256: String,
}

/// How jobs of each kind run.
#[derive(Debug, Clone, Copy)]
pub struct JobPolicy {
    pub max_attempts: u32,
}

/// What `request_import` did.
pub struct JobRequested {
    pub job: JobInfo,
    /// An earlier request with the same `Idempotency-Key` (or message id) made it.
    pub replayed: bool,
}

/// A job as a worker loads it.
pub struct LoadedJob {
    pub job: Job,
    /// An import's full source URL.
    pub url: Option<String>,
    /// The request's correlation id, carried by everything the job records.
    pub correlation_id: String,
}

impl App {
    /// Queues an import (whoever may upload to the session may import into it).
    /// `JobQueued` is appended in this transaction; the relay hands it to the workers.
    pub async fn request_import(
        &self,
        principal: &Principal,
        ctx: &CommandContext,
        request: ImportRequest,
        idempotency: Option<IdempotencyKey>,
        policy: JobPolicy,
    ) -> Result<JobRequested, AppError> {
        self.session_for(principal, request.id_session).await?;
        let job_uuid = Uuid::new_v4();
        let key_lock = idempotency
            .as_ref()
            .map(|key| format!("idempotency-{}-{}-{}", principal.kind.as_str(), principal.uuid, key.key));
        let outcome = in_transaction!(self, |tx| {
            if let Some(lock) = &key_lock {
                // Two requests with one key at once: the second waits, then finds the first's job.
                eventstore::lock_stream(&tx, lock).await?;
            }
            if let Some(key) = &idempotency {
                let earlier = tx
                    .query_opt(
                        "SELECT job_uuid, body_sha256 FROM idempotency_keys
                         WHERE principal_kind = $1 AND principal_uuid = $2 AND key = $3",
                        &[&principal.kind.as_str(), &principal.uuid, &key.key],
                    )
                    .await?;
                if let Some(row) = earlier {
                    let (earlier_job, earlier_body): (Uuid, String) = (row.try_get(0)?, row.try_get(1)?);
                    if earlier_body != key.body_sha256 {
                        return Err(AppError::Domain(DomainError::Conflict(
                            "this Idempotency-Key was used with another request body".into(),
                        )));
                    }
                    return Ok(Err(earlier_job));
                }
            }
            receive_once(&tx, ctx, &job_stream(job_uuid)).await?;
            let queued = JobQueued {
                job_uuid,
                kind: JobKind::Import,
                id_session: request.id_session,
                requested_by: principal.actor(),
                max_attempts: policy.max_attempts.max(1),
                import: Some(request.spec.clone()),
            };
            stage::<Job>(&tx, ctx, &job_stream(job_uuid), JobCommand::Queue(queued)).await?;
            tx.execute("INSERT INTO job_inputs (job_uuid, url) VALUES ($1, $2)", &[&job_uuid, &request.url.as_str()])
                .await?;
            if let Some(key) = &idempotency {
                tx.execute(
                    "INSERT INTO idempotency_keys (principal_kind, principal_uuid, key, body_sha256, job_uuid)
                     VALUES ($1, $2, $3, $4, $5)",
                    &[&principal.kind.as_str(), &principal.uuid, &key.key, &key.body_sha256, &job_uuid],
                )
                .await?;
            }
            Ok(Ok(job_uuid))
        })?;
        let (uuid, replayed) = match outcome {
            Ok(uuid) => (uuid, false),
            Err(earlier) => (earlier, true),
        };
        let client = self.pool.get().await?;
        let job = read::job(&client, uuid).await?.ok_or(DomainError::NotFound("job"))?;
        Ok(JobRequested { job, replayed })
    }

    /// The job, if `principal` may see it: whoever may reach its session (its current
    /// registration), and whoever asked for it.
    pub async fn job_for(&self, principal: &Principal, uuid: Uuid) -> Result<JobInfo, AppError> {
        let client = self.pool.get().await?;
        let job = read::job(&client, uuid).await?.ok_or(DomainError::NotFound("job"))?;
        if principal.is_privileged() || job.requested_by == principal.uuid {
            return Ok(job);
        }
        let session = match SessionId::new(job.id_session) {
            Ok(id) => read::session(&client, id).await?,
            Err(_) => None,
        };
        let admits = session.is_some_and(|s| {
            job.created_position > s.registered_position && s.details().is_some_and(|d| d.grants(principal))
        });
        if !admits {
            return Err(AppError::Forbidden(format!("no access to job {uuid}")));
        }
        Ok(job)
    }

    /// Cancels a job that has not finished: a running one stops within a second and
    /// what it made is removed (see the worker).
    pub async fn cancel_job(
        &self,
        principal: &Principal,
        ctx: &CommandContext,
        uuid: Uuid,
    ) -> Result<JobInfo, AppError> {
        self.job_for(principal, uuid).await?;
        let actor = principal.actor();
        in_transaction!(self, |tx| {
            stage::<Job>(&tx, ctx, &job_stream(uuid), JobCommand::Cancel(actor)).await?;
            read::job(&tx, uuid).await?.ok_or(AppError::Domain(DomainError::NotFound("job")))
        })
    }

    /// A session's jobs, newest first; `before` is the `created_position` paging key.
    pub async fn session_jobs(
        &self,
        principal: &Principal,
        id: SessionId,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<JobInfo>, AppError> {
        let session = self.session_for(principal, id).await?;
        let client = self.pool.get().await?;
        Ok(read::session_jobs(&client, id, session.registered_position, before, limit).await?)
    }

    // ----- what workers do -----

    pub async fn load_job(&self, uuid: Uuid) -> Result<LoadedJob, AppError> {
        let client = self.pool.get().await?;
        let history = eventstore::read_stream(&client, &job_stream(uuid), 0).await?;
        let mut job = Job::default();
        for recorded in &history {
            if let Some(event) =
                <JobEvent as crate::domain::DomainEvent>::from_parts(&recorded.event_type, &recorded.data)
            {
                job.apply(&event.map_err(|_| AppError::CorruptEvent(recorded.id))?);
            }
        }
        let url = client
            .query_opt("SELECT url FROM job_inputs WHERE job_uuid = $1", &[&uuid])
            .await?
            .map(|row| row.try_get(0))
            .transpose()?;
        let correlation_id = history
            .first()
            .and_then(|first| first.metadata.get("correlation_id")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| uuid.to_string());
        Ok(LoadedJob { job, url, correlation_id })
    }

    /// Whether the job was cancelled (a running worker looks every second).
    pub async fn job_cancelled(&self, uuid: Uuid) -> Result<bool, AppError> {
        let client = self.pool.get().await?;
        let row = client.query_opt("SELECT status FROM jobs WHERE job_uuid = $1", &[&uuid]).await?;
        Ok(row.is_some_and(|row| row.get::<_, &str>(0) == "cancelled"))
    }

    /// Runs `command` on the job's stream.
    async fn on_job(&self, ctx: &CommandContext, uuid: Uuid, command: JobCommand) -> Result<Job, AppError> {
        in_transaction!(self, |tx| {
            let (job, _) = stage::<Job>(&tx, ctx, &job_stream(uuid), command.clone()).await?;
            Ok(job)
        })
    }

    pub async fn start_job(
        &self,
        ctx: &CommandContext,
        uuid: Uuid,
        attempt: u32,
        worker: &str,
        lease_until: DateTime<Utc>,
    ) -> Result<Job, AppError> {
        let start = JobCommand::Start { attempt, worker: worker.to_owned(), now: Utc::now(), lease_until };
        self.on_job(ctx, uuid, start).await
    }

    pub async fn job_progress(
        &self,
        ctx: &CommandContext,
        uuid: Uuid,
        attempt: u32,
        progress: (u64, Option<u64>),
        lease_until: DateTime<Utc>,
    ) -> Result<Job, AppError> {
        let (done, total) = progress;
        self.on_job(ctx, uuid, JobCommand::Progress { attempt, done, total, lease_until }).await
    }

    pub async fn job_failed(
        &self,
        ctx: &CommandContext,
        uuid: Uuid,
        attempt: u32,
        error: &str,
        retryable: bool,
        retry_at: DateTime<Utc>,
    ) -> Result<Job, AppError> {
        self.on_job(ctx, uuid, JobCommand::Fail { attempt, error: error.to_owned(), retryable, retry_at }).await
    }

    /// The lease sweeper: a running attempt whose worker stopped renewing its lease.
    pub async fn expire_job_lease(
        &self,
        ctx: &CommandContext,
        uuid: Uuid,
        retry_at: DateTime<Utc>,
    ) -> Result<Job, AppError> {
        self.on_job(ctx, uuid, JobCommand::ExpireLease { now: Utc::now(), retry_at }).await
    }

    /// An import's bytes are durable under the asset's uuid: records the asset and the
    /// job's success in one transaction. The asset stream must be new (its id derives
    /// from the job), and the session must still be the one the job was asked for.
    pub async fn import_succeeded(
        &self,
        ctx: &CommandContext,
        uuid: Uuid,
        attempt: u32,
        imported: AssetImported,
    ) -> Result<(), AppError> {
        let asset_uuid = imported.asset.asset_uuid;
        let id_session = imported.asset.id_session;
        let result = JobResult {
            asset_uuid,
            asset_file_size: imported.asset.asset_file_size,
            asset_sha256: imported.asset.asset_sha256.clone(),
        };
        in_transaction!(self, |tx| {
            let (job, _) =
                stage::<Job>(&tx, ctx, &job_stream(uuid), JobCommand::Succeed { attempt, result: result.clone() })
                    .await?;
            let created_position: Option<i64> = tx
                .query_opt("SELECT created_position FROM jobs WHERE job_uuid = $1", &[&uuid])
                .await?
                .map(|r| r.get(0));
            let session = tx
                .query_opt(
                    "SELECT registered_position FROM sessions WHERE id_session = $1 FOR SHARE",
                    &[&id_session.get()],
                )
                .await?;
            let same_registration =
                matches!((session, created_position), (Some(row), Some(created)) if row.get::<_, i64>(0) < created);
            if !same_registration {
                return Err(AppError::Domain(DomainError::NotFound("session")));
            }
            eventstore::refuse_if_written_after_us(&tx, &[id_session.stream()]).await?;
            let import = AssetCommand::Import(imported.clone());
            stage_unlocked::<Asset>(&tx, ctx, &super::asset_stream(asset_uuid), import).await?;
            Ok(job)
        })?;
        Ok(())
    }
}

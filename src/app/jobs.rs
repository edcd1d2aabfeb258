//! Jobs in the application layer: what the HTTP and AMQP edges share to request an
//! import, read and cancel jobs, and the commands a worker runs on a job's stream
//! (start, progress, succeed, fail, lease expiry). Every change is an event appended
//! with the expected version, like every other command.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use uuid::Uuid;

use super::{receive_once, stage, stage_unlocked, App, AppError, CommandContext};
use crate::blobs::SealedBlob;
use crate::domain::asset::{Asset, AssetCommand, AssetImported, AssetSource, AssetUploaded};
use crate::domain::job::{
    asset_uuid_of, ImportResult, ImportSpec, Job, JobCommand, JobEvent, JobKind, JobQueued, JobResult, JobStatus,
};
use crate::domain::names::{
    check_storable_json, AssetName, Directory, FileName, InvalidValue, MediaType, SessionId, Sha256Hex, Tags,
};
use crate::domain::principal::{Actor, Principal, PrincipalKind};
use crate::domain::upload::{Upload, UploadCommand};
use crate::domain::DomainError;
use crate::eventstore;
use crate::projections::read::{self, JobInfo};

/// Longest import URL accepted.
pub const MAX_URL_BYTES: usize = 8 * 1024;

pub fn job_stream(uuid: Uuid) -> String {
    <Job as crate::domain::Aggregate>::stream(uuid)
}

/// The body of `POST /imports` and of the AMQP command `import.request`. Fields it
/// does not know are refused (a misspelt `sha256` must not silently go unchecked).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
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
pub(crate) fn integral<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
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
    /// The source; none for the import of a two-phase upload (`spec.upload_uuid`).
    pub url: Option<url::Url>,
    pub spec: ImportSpec,
    /// For an upload's import: its position (the upload must belong to the session's
    /// current registration).
    pub upload_created_position: Option<i64>,
}

/// The body of `POST /imports` that imports a received two-phase upload (instead of a
/// URL). Fields it does not know are refused.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UploadImportBody {
    #[schema(value_type = crate::http::fields::UuidText)]
    pub upload_uuid: Uuid,
    #[schema(value_type = crate::http::fields::AssetName)]
    pub asset_name: String,
    /// MIME type; else the type declared for the upload, else the PUT's Content-Type,
    /// else guessed from the file name.
    #[schema(value_type = Option<crate::http::fields::MediaType>)]
    pub asset_type: Option<String>,
    #[schema(value_type = Option<crate::http::fields::AssetDateTime>)]
    pub asset_datetime: Option<String>,
    /// The SHA-256 the bytes must have (hex); checked by the job.
    #[schema(value_type = Option<String>, pattern = "^[0-9a-fA-F]{64}$")]
    pub sha256: Option<String>,
    #[schema(value_type = Option<crate::http::fields::Directory>)]
    pub directory: Option<String>,
    #[schema(value_type = Option<crate::http::fields::Tags>)]
    pub tags: Option<Vec<String>>,
    #[schema(value_type = Option<crate::http::fields::Metadata>)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Either body of `POST /imports` (and of `import.request`): a URL, or a received upload.
#[derive(Debug, Clone, schemars::JsonSchema)]
#[schemars(untagged)]
#[allow(clippy::large_enum_variant)]
pub enum AnyImportBody {
    Url(ImportBody),
    Upload(UploadImportBody),
}

impl utoipa::PartialSchema for AnyImportBody {
    /// One of the two bodies, as they are (not wrapped in a variant's name).
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::OneOfBuilder::new()
            .item(utoipa::openapi::Ref::from_schema_name("ImportBody"))
            .item(utoipa::openapi::Ref::from_schema_name("UploadImportBody"))
            .description(Some("A URL to fetch (`url`), or a received two-phase upload to import (`upload_uuid`)"))
            .into()
    }
}

impl utoipa::ToSchema for AnyImportBody {
    fn schemas(schemas: &mut Vec<(String, utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>)>) {
        schemas.push(("ImportBody".into(), <ImportBody as utoipa::PartialSchema>::schema()));
        schemas.push(("UploadImportBody".into(), <UploadImportBody as utoipa::PartialSchema>::schema()));
    }
}

impl<'de> Deserialize<'de> for AnyImportBody {
    /// By the presence of `upload_uuid`, so that each shape's own errors are reported
    /// (an untagged enum would only say that neither matched).
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        let result = match value.get("upload_uuid") {
            Some(_) => serde_json::from_value(value).map(Self::Upload),
            None => serde_json::from_value(value).map(Self::Url),
        };
        result.map_err(serde::de::Error::custom)
    }
}

impl UploadImportBody {
    /// The import as `JobQueued` will say (the session is the upload's, read by
    /// [`App::request_import`]).
    pub fn validate(self, principal: &Principal) -> Result<ImportSpec, InvalidValue> {
        let fields = super::uploads::AssetFields {
            asset_name: AssetName::parse(&self.asset_name)?,
            asset_type: self
                .asset_type
                .as_deref()
                .map(|given| crate::http::fields::check_media_type(given).and_then(|()| MediaType::parse(given)))
                .transpose()?,
            asset_datetime: self
                .asset_datetime
                .as_deref()
                .map(crate::http::fields::parse_asset_datetime)
                .transpose()?,
            directory: match self.directory.as_deref() {
                Some(dir) => Directory::parse(dir)?,
                None => Directory::root(),
            },
            tags: Tags::parse(self.tags.unwrap_or_default())?,
            metadata: self.metadata.unwrap_or_default(),
        };
        check_storable_json("metadata", &serde_json::Value::Object(fields.metadata.clone()))?;
        Ok(ImportSpec {
            source_url: None,
            upload_uuid: Some(self.upload_uuid),
            asset_datetime: fields.asset_datetime,
            asset_name: fields.asset_name,
            asset_type: fields.asset_type,
            sha256: self.sha256.as_deref().map(|s| Sha256Hex::parse(&s.to_ascii_lowercase())).transpose()?,
            directory: fields.directory,
            tags: fields.tags,
            metadata: fields.metadata,
            // The upload's creator (filled in from the upload).
            asset_creator: principal.actor(),
        })
    }
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
        let url: url::Url =
            self.url.trim().parse().map_err(|error| InvalidValue::new("url", format!("not a URL: {error}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
            return Err(InvalidValue::new("url", "must be an http or https URL with a host"));
        }
        if url.port() == Some(0) {
            return Err(InvalidValue::new("url", "port 0 cannot be connected to"));
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
            source_url: Some(crate::jobs::fetch::redacted(&url)),
            upload_uuid: None,
            asset_datetime: None,
            asset_name,
            asset_type,
            sha256,
            directory,
            tags,
            metadata,
            asset_creator,
        };
        Ok(ImportRequest { id_session, url: Some(url), spec, upload_created_position: None })
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

/// Where a running attempt stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptState {
    /// Still the job's running attempt.
    Current,
    /// The job was cancelled.
    Cancelled,
    /// No longer the job's: it was run again (this worker lost its lease) or ended.
    Superseded,
}

/// A job as a worker loads it.
pub struct LoadedJob {
    pub job: Job,
    /// An import's full source URL.
    pub url: Option<String>,
    /// The request's correlation id, carried by everything the job records.
    pub correlation_id: String,
}

impl LoadedJob {
    /// The asset an import of this job makes of `bytes`: named and typed as the request
    /// said, else as the source said (its Content-Type, the last segment of its URL),
    /// else from the name. Its id derives from the job.
    pub fn imported_asset(
        &self,
        bytes: &SealedBlob,
        source_file_name: Option<&str>,
        source_type: Option<&str>,
    ) -> Result<AssetImported, String> {
        let queued = self.job.queued.as_ref().ok_or("the job has no request")?;
        let spec = queued.import.as_ref().ok_or("the job is not an import")?;
        let file_name = source_file_name
            .and_then(|name| FileName::parse(name).ok())
            .or_else(|| FileName::parse(spec.asset_name.as_str()).ok())
            .unwrap_or_else(|| FileName::parse("import").expect("a valid name"));
        let asset_type = spec
            .asset_type
            .clone()
            .or_else(|| source_type.and_then(|t| MediaType::parse(t.trim()).ok()))
            .unwrap_or_else(|| MediaType::guess_from_filename(&file_name));
        Ok(AssetImported {
            asset: AssetUploaded {
                asset_uuid: asset_uuid_of(queued.job_uuid),
                id_session: queued.id_session.ok_or("an import names its session")?,
                asset_name: spec.asset_name.clone(),
                asset_original_filename: file_name,
                asset_type,
                asset_file_size: bytes.size,
                asset_sha256: bytes.sha256.clone(),
                asset_datetime: crate::domain::names::storable(Utc::now()),
                directory: spec.directory.clone(),
                tags: spec.tags.clone(),
                metadata: spec.metadata.clone(),
                asset_creator: spec.asset_creator,
                asset_source: AssetSource::Import,
                blob: Some(bytes.location.clone()),
                id_asset: None,
            },
            job_uuid: queued.job_uuid,
            source_url: spec.source_url.clone(),
            upload_uuid: None,
        })
    }
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
        let upload_uuid = request.spec.upload_uuid;
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
            // Read again under a share lock: a session deleted since the check above is
            // not imported into, and one being deleted now waits for this job (and then
            // cancels it with the session's other jobs).
            super::uploads::lock_session_admitting(&tx, request.id_session, request.upload_created_position, principal)
                .await
                .map_err(|error| match error {
                    AppError::Forbidden(_) => AppError::Domain(DomainError::NotFound("session")),
                    other => other,
                })?;
            if let Some(upload_uuid) = upload_uuid {
                // The upload is the job's from now on (a second import is refused).
                let queue = UploadCommand::QueueImport { job_uuid, now: Utc::now() };
                stage::<Upload>(&tx, ctx, &super::uploads::upload_stream(upload_uuid), queue).await?;
            }
            let queued = JobQueued {
                job_uuid,
                kind: JobKind::Import,
                id_session: Some(request.id_session),
                requested_by: principal.actor(),
                max_attempts: policy.max_attempts.max(1),
                import: Some(request.spec.clone()),
                archive_uuid: None,
            };
            stage::<Job>(&tx, ctx, &job_stream(job_uuid), JobCommand::Queue(Box::new(queued))).await?;
            if let Some(url) = &request.url {
                tx.execute("INSERT INTO job_inputs (job_uuid, url) VALUES ($1, $2)", &[&job_uuid, &url.as_str()])
                    .await?;
            }
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
        if job.kind == "archive" {
            // An archive is its owner's: so is its job.
            return Err(AppError::Forbidden(format!("job {uuid} builds someone else's archive")));
        }
        let session = match job.id_session.map(SessionId::new) {
            Some(Ok(id)) => read::session(&client, id).await?,
            _ => None,
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
        let (job, upload_bytes) = in_transaction!(self, |tx| {
            let (state, _) = stage::<Job>(&tx, ctx, &job_stream(uuid), JobCommand::Cancel(actor)).await?;
            let upload_bytes = upload_follows_job(&tx, ctx, uuid, &state).await?;
            super::archives::archive_follows_job(&tx, ctx, uuid, &state, false).await?;
            Ok((read::job(&tx, uuid).await?.ok_or(AppError::Domain(DomainError::NotFound("job")))?, upload_bytes))
        })?;
        self.discard_import_bytes(uuid).await;
        if let Some(location) = upload_bytes {
            self.remove_upload_bytes(&location).await;
        }
        Ok(job)
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

    /// Whether `attempt` is still the job's running attempt: a running worker looks
    /// every second.
    pub async fn attempt_state(&self, uuid: Uuid, attempt: u32) -> Result<AttemptState, AppError> {
        let client = self.pool.get().await?;
        let row = client.query_opt("SELECT status, attempts FROM jobs WHERE job_uuid = $1", &[&uuid]).await?;
        let Some(row) = row else { return Ok(AttemptState::Superseded) };
        let (status, attempts): (&str, i32) = (row.try_get(0)?, row.try_get(1)?);
        Ok(match status {
            "cancelled" => AttemptState::Cancelled,
            "running" if i64::from(attempts) == i64::from(attempt) => AttemptState::Current,
            _ => AttemptState::Superseded,
        })
    }

    /// Runs `command` on the job's stream. A job that ends without success loses
    /// whatever bytes an attempt left under its asset's id.
    async fn on_job(&self, ctx: &CommandContext, uuid: Uuid, command: JobCommand) -> Result<Job, AppError> {
        let started = matches!(command, JobCommand::Start { .. });
        let (job, upload_bytes) = in_transaction!(self, |tx| {
            let (job, _) = stage::<Job>(&tx, ctx, &job_stream(uuid), command.clone()).await?;
            let upload_bytes = upload_follows_job(&tx, ctx, uuid, &job).await?;
            super::archives::archive_follows_job(&tx, ctx, uuid, &job, started).await?;
            Ok((job, upload_bytes))
        })?;
        if matches!(job.status, JobStatus::Failed | JobStatus::Cancelled) {
            self.discard_import_bytes(uuid).await;
        }
        if let Some(location) = upload_bytes {
            self.remove_upload_bytes(&location).await;
        }
        Ok(job)
    }

    /// Removes the bytes an import attempt may have left under its asset's id, unless
    /// the asset is recorded. Under the job's lock: bytes take that id only in the
    /// transaction that records the asset, which holds the same lock (see
    /// [`App::import_succeeded`]), so this never removes an asset's bytes. Best effort:
    /// what it cannot remove now, a later attempt replaces, or cleanup removes.
    pub async fn discard_import_bytes(&self, job_uuid: Uuid) {
        if let Err(error) = self.try_discard_import_bytes(job_uuid).await {
            tracing::warn!(%job_uuid, %error, "could not remove an import's leftover bytes; the next attempt or cleanup will");
        }
    }

    async fn try_discard_import_bytes(&self, job_uuid: Uuid) -> Result<(), AppError> {
        let asset_uuid = asset_uuid_of(job_uuid);
        in_transaction!(self, |tx| {
            eventstore::lock_stream(&tx, &job_stream(job_uuid)).await?;
            let asset = super::asset_stream(asset_uuid);
            if tx.query_opt("SELECT 1 FROM events WHERE stream = $1 LIMIT 1", &[&asset]).await?.is_none() {
                self.blobs.remove_everywhere(&crate::blobs::key_for(asset_uuid)).await?;
            }
            Ok(())
        })
    }

    /// A stopping worker hands its running attempt back, to run again at once.
    pub async fn release_job(&self, ctx: &CommandContext, uuid: Uuid, attempt: u32) -> Result<Job, AppError> {
        self.on_job(ctx, uuid, JobCommand::Release { attempt, now: Utc::now() }).await
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

    /// An import's bytes are complete and checked: in one transaction, under the job's
    /// lock and only while `attempt` is still the job's, the asset and the job's
    /// success are recorded and, last, the bytes become the asset's blob. The asset
    /// stream must be new (its id derives from the job), and the session must still be
    /// the one the job was asked for. Nothing else ever puts bytes under that id, so a
    /// stale attempt (its lease lost, the job run again elsewhere) can never touch
    /// another's asset.
    pub async fn import_succeeded(
        &self,
        ctx: &CommandContext,
        uuid: Uuid,
        attempt: u32,
        imported: AssetImported,
        bytes: Option<SealedBlob>,
    ) -> Result<(), AppError> {
        let recorded = self.record_import(ctx, uuid, attempt, imported, bytes).await;
        if recorded.is_err() {
            // Also when the commit's outcome is unknown: the bytes stay if the asset
            // turns out to be recorded.
            self.discard_import_bytes(uuid).await;
        }
        recorded
    }

    async fn record_import(
        &self,
        ctx: &CommandContext,
        uuid: Uuid,
        attempt: u32,
        imported: AssetImported,
        bytes: Option<SealedBlob>,
    ) -> Result<(), AppError> {
        let asset_uuid = imported.asset.asset_uuid;
        let id_session = imported.asset.id_session;
        let result = JobResult::Import(ImportResult {
            asset_uuid,
            asset_file_size: imported.asset.asset_file_size,
            asset_sha256: imported.asset.asset_sha256.clone(),
        });
        let mut bytes = Some(bytes);
        in_transaction!(self, |tx| {
            // The session's row before the job's stream: the order `delete_session` takes
            // them in (it cancels the session's jobs), so the two cannot deadlock.
            let session = tx
                .query_opt(
                    "SELECT registered_position FROM sessions WHERE id_session = $1 FOR SHARE",
                    &[&id_session.get()],
                )
                .await?;
            let created_position: Option<i64> = tx
                .query_opt("SELECT created_position FROM jobs WHERE job_uuid = $1", &[&uuid])
                .await?
                .map(|r| r.try_get(0))
                .transpose()?;
            let same_registration = match (session, created_position) {
                (Some(row), Some(created)) => row.try_get::<_, i64>(0)? < created,
                _ => false,
            };
            if !same_registration {
                return Err(AppError::Domain(DomainError::NotFound("session")));
            }
            stage::<Job>(&tx, ctx, &job_stream(uuid), JobCommand::Succeed { attempt, result: result.clone() }).await?;
            eventstore::refuse_if_written_after_us(&tx, &[id_session.stream()]).await?;
            if let Some(upload_uuid) = imported.upload_uuid {
                // The upload becomes the asset: it must still be this job's.
                let done = UploadCommand::ImportSucceeded { job_uuid: uuid };
                stage::<Upload>(&tx, ctx, &super::uploads::upload_stream(upload_uuid), done).await?;
            }
            let import = AssetCommand::Import(imported.clone());
            stage_unlocked::<Asset>(&tx, ctx, &super::asset_stream(asset_uuid), import).await?;
            // Last: nothing that could run this body again follows. It replaces what a
            // crashed attempt of this job may have left there. (An upload's import has
            // nothing to place: its bytes are where the upload put them.)
            if let Some(sealed) = bytes.take().flatten() {
                sealed.place().await?;
            }
            Ok(())
        })
    }
}

/// In a job's transaction, after its event: the upload an import of an upload works on
/// follows the job's end. A failed import fails the upload (its bytes go: returned, for
/// removal once committed); a cancelled one gives the upload back (`received`).
pub(super) async fn upload_follows_job(
    tx: &deadpool_postgres::Transaction<'_>,
    ctx: &CommandContext,
    job_uuid: Uuid,
    job: &Job,
) -> Result<Option<crate::blobs::BlobLocation>, AppError> {
    let Some(upload_uuid) = job.queued.as_ref().and_then(|q| q.import.as_ref()).and_then(|i| i.upload_uuid) else {
        return Ok(None);
    };
    let command = match job.status {
        JobStatus::Failed => UploadCommand::ImportFailed {
            job_uuid,
            error: job.last_error.clone().unwrap_or_else(|| "the import failed".into()),
        },
        JobStatus::Cancelled => UploadCommand::ImportCancelled { job_uuid },
        _ => return Ok(None),
    };
    let failed = matches!(command, UploadCommand::ImportFailed { .. });
    let (upload, events) = stage::<Upload>(tx, ctx, &super::uploads::upload_stream(upload_uuid), command).await?;
    Ok(upload.received.filter(|_| failed && !events.is_empty()).map(|received| received.blob))
}

impl App {
    /// Queues the expiry of the uploads past their time (a job of kind
    /// `expire_uploads`, on no session). The scheduler of "Archives and cleanup" runs it
    /// periodically; `assetd expire-uploads` queues it by hand.
    pub async fn request_upload_expiry(&self, ctx: &CommandContext, policy: JobPolicy) -> Result<Uuid, AppError> {
        let job_uuid = Uuid::new_v4();
        let queued = JobQueued {
            job_uuid,
            kind: JobKind::ExpireUploads,
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

    /// A worker's attempt whose work is done once it ran (expiry, cleanup, purge):
    /// records its success.
    pub async fn job_succeeded(
        &self,
        ctx: &CommandContext,
        uuid: Uuid,
        attempt: u32,
        result: JobResult,
    ) -> Result<(), AppError> {
        self.on_job(ctx, uuid, JobCommand::Succeed { attempt, result }).await.map(|_| ())
    }
}

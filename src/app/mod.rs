//! Application commands and queries: the one code path every edge (HTTP today, AMQP
//! commands next) goes through. A command loads its aggregate's stream, lets the pure
//! domain decide the events, appends them with the expected version and updates the
//! projections in the same transaction; a version conflict retries the whole command.
//! Access rules are checked here, against the session read model.

use std::sync::Arc;

use deadpool_postgres::{GenericClient, Pool, Transaction};
use serde_json::Value;
use uuid::Uuid;

use crate::auth::{Authenticator, TokenError};
use crate::blobs::{BlobLocation, BlobStore, StoredBlob, TempBlob};
use crate::domain::asset::{Asset, AssetCommand, AssetUploaded, DeletionReason};
use crate::domain::names::{FileName, SessionId};
use crate::domain::principal::{Actor, Principal};
use crate::domain::session::{Session, SessionCommand, SessionDetails, UpsertSession};
use crate::domain::{Aggregate, DomainError, DomainEvent};
use crate::eventstore::{self, EventStoreError, ExpectedVersion, NewEvent, RecordedEvent};
use crate::projections::read::{self, AssetInfo, ListingCursor, SessionInfo};
use crate::projections::{self, ProjectionError};

/// The largest command body taken, over HTTP (JSON bodies) and AMQP alike.
pub const MAX_COMMAND_BODY: usize = 1 << 20;

/// How often a command is retried when another writer got to its stream first.
pub(crate) const MAX_ATTEMPTS: u32 = 8;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    AccessTokenExpired(String),
    #[error("event store: {0}")]
    EventStore(#[from] EventStoreError),
    #[error("projection: {0}")]
    Projection(#[from] ProjectionError),
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("database unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("event {0} has an unreadable payload")]
    CorruptEvent(Uuid),
    #[error("the commit's outcome is unknown: {0}")]
    CommitOutcomeUnknown(String),
    #[error("storage: {0}")]
    Storage(#[from] std::io::Error),
    #[error("a command task failed: {0}")]
    TaskFailed(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("message {0:?} was already received")]
    AlreadyReceived(String),
    /// The request was understood but what it carries is not what it must be (bytes
    /// that do not match their declared size or SHA-256): 422 with this code.
    #[error("{1}")]
    Unprocessable(&'static str, String),
    /// Too many of something at once (unfinished archives of one owner): 429 with this code.
    #[error("{1}")]
    TooMany(&'static str, String),
}

impl AppError {
    /// Another writer got there first, or Postgres broke a deadlock (or a serialization
    /// conflict) by failing this transaction: running the command again is the answer.
    pub(crate) fn is_retryable_conflict(&self) -> bool {
        let database = match self {
            Self::EventStore(e) if e.is_conflict() => return true,
            Self::EventStore(EventStoreError::Database(e)) | Self::Database(e) => e,
            Self::Projection(ProjectionError::Database(e)) => e,
            _ => return false,
        };
        use tokio_postgres::error::SqlState;
        database.code().is_some_and(|code| {
            *code == SqlState::T_R_DEADLOCK_DETECTED || *code == SqlState::T_R_SERIALIZATION_FAILURE
        })
    }
}

/// A JSON body written one way whatever its key order and white space (it parsed as
/// JSON: the command did), so that a sender's retry, serialised anew, is the same body.
pub fn canonical_json(body: &[u8]) -> String {
    fn sorted(value: Value) -> Value {
        match value {
            Value::Object(object) => {
                let mut entries: Vec<(String, Value)> = object.into_iter().collect();
                entries.sort_by(|(a, _), (b, _)| a.cmp(b));
                Value::Object(entries.into_iter().map(|(key, value)| (key, sorted(value))).collect())
            }
            Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
            other => other,
        }
    }
    serde_json::from_slice(body).map(sorted).map(|value| value.to_string()).unwrap_or_default()
}

/// The SHA-256 (hex) of a JSON body's [`canonical_json`]: how a message or request sent
/// again is recognised as the same.
pub fn body_sha256(body: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(canonical_json(body).as_bytes()))
}

/// Who asked, and the ids that tie the resulting events to the request.
#[derive(Debug, Clone)]
pub struct CommandContext {
    pub actor: Actor,
    pub request_id: String,
    pub correlation_id: String,
    /// The message the command came in (AMQP); none for HTTP requests.
    pub message: Option<ReceivedMessage>,
}

/// A command's message, run once per id: see [`receive_once`].
#[derive(Debug, Clone)]
pub struct ReceivedMessage {
    /// As recorded: also the events' `causation_id`.
    pub id: String,
    pub command: &'static str,
    pub body_sha256: String,
}

impl CommandContext {
    pub fn for_request(principal: &Principal, request_id: &str) -> Self {
        Self {
            actor: principal.actor(),
            request_id: request_id.to_owned(),
            correlation_id: request_id.to_owned(),
            message: None,
        }
    }

    fn metadata(&self) -> serde_json::Value {
        serde_json::to_value(EventMetadata {
            actor: self.actor,
            correlation_id: self.correlation_id.clone(),
            causation_id: self.message.as_ref().map(|message| message.id.clone()),
            request_id: self.request_id.clone(),
            service_version: env!("CARGO_PKG_VERSION").to_owned(),
        })
        .expect("metadata serializes")
    }
}

/// The `metadata` of every event assetd records: who, and the ids that tie it to the
/// request or message that caused it.
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct EventMetadata {
    pub actor: Actor,
    /// The HTTP request's X-Request-Id, or the AMQP command's message id.
    pub request_id: String,
    /// Shared by everything one request or command caused: the command message's
    /// `correlation_id` (else its id); for HTTP, the request id.
    pub correlation_id: String,
    /// The AMQP message id of the command that caused it; null for HTTP requests.
    #[schemars(required, extend("type" = ["string", "null"]))]
    pub causation_id: Option<String>,
    /// assetd's version that recorded it.
    pub service_version: String,
}

/// The session `asset` belongs to by id (registered now, possibly again since).
async fn session_of(client: &impl GenericClient, asset: &AssetInfo) -> Result<Option<SessionInfo>, AppError> {
    match SessionId::new(asset.id_session) {
        Ok(id) => Ok(read::session(client, id).await?),
        Err(_) => Ok(None),
    }
}

pub fn asset_stream(uuid: Uuid) -> String {
    <Asset as Aggregate>::stream(uuid)
}

/// Loads `stream` in `tx`, lets the aggregate handle `command`, appends the events with
/// the expected version and projects them. Returns the state after the new events.
async fn stage<A: Aggregate>(
    tx: &Transaction<'_>,
    ctx: &CommandContext,
    stream: &str,
    command: A::Command,
) -> Result<(A, Vec<RecordedEvent>), AppError> {
    eventstore::lock_stream(tx, stream).await?;
    stage_unlocked(tx, ctx, stream, command).await
}

/// [`stage`] without the stream lock, for a command that touches many streams at once
/// (one advisory lock each would fill Postgres's shared lock table); the version key
/// still refuses a concurrent append, and the command is retried.
async fn stage_unlocked<A: Aggregate>(
    tx: &Transaction<'_>,
    ctx: &CommandContext,
    stream: &str,
    command: A::Command,
) -> Result<(A, Vec<RecordedEvent>), AppError> {
    let history = eventstore::read_stream(tx, stream, 0).await?;
    let mut state = A::default();
    for recorded in &history {
        if let Some(event) = A::Event::from_parts(&recorded.event_type, &recorded.data) {
            state.apply(&event.map_err(|_| AppError::CorruptEvent(recorded.id))?);
        }
    }
    let expected = match history.last() {
        None => ExpectedVersion::NoStream,
        Some(last) => ExpectedVersion::Exact(last.version),
    };
    let events = state.handle(command)?;
    let recorded = eventstore::append(tx, stream, expected, &new_events(ctx, &events)).await?;
    for event in &recorded {
        projections::apply(tx, event).await?;
    }
    events.iter().for_each(|event| state.apply(event));
    Ok((state, recorded))
}

/// The events a command decided, as the event store takes them.
fn new_events<E: DomainEvent>(ctx: &CommandContext, events: &[E]) -> Vec<NewEvent> {
    let metadata = ctx.metadata();
    events
        .iter()
        .map(|event| NewEvent {
            id: Uuid::new_v4(),
            event_type: event.event_type().to_owned(),
            data: event.to_data(),
            metadata: metadata.clone(),
        })
        .collect()
}

/// In a command's transaction, first: takes the lock of `stream` (the one the command
/// starts from), then records the message's receipt, or finds that the message was
/// already received ([`AppError::AlreadyReceived`]). A copy being run at the same time
/// elsewhere waits on that lock until its transaction ends. The lock comes first: the
/// receipt gives the transaction an id, and a transaction with an id holds back the
/// global log (and conflicts with the lock holder's append) while it waits.
async fn receive_once(tx: &Transaction<'_>, ctx: &CommandContext, stream: &str) -> Result<(), AppError> {
    let Some(message) = &ctx.message else { return Ok(()) };
    // A message's command does not wait for long: it goes back to the queue instead,
    // and the consumer is not held up.
    tx.batch_execute(&format!("SET LOCAL lock_timeout = '{}ms'", MESSAGE_LOCK_TIMEOUT.as_millis())).await?;
    eventstore::lock_stream(tx, stream).await?;
    let inserted = tx
        .execute(
            "INSERT INTO command_receipts (message_id, command, body_sha256) VALUES ($1, $2, $3)
             ON CONFLICT (message_id) DO NOTHING",
            &[&message.id, &message.command, &message.body_sha256],
        )
        .await?;
    if inserted == 0 {
        return Err(AppError::AlreadyReceived(message.id.clone()));
    }
    Ok(())
}

/// The longest a command from a message waits for a lock.
const MESSAGE_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs `body` in a transaction, committing on success and retrying it whole on a
/// version conflict.
macro_rules! in_transaction {
    ($app:expr, |$tx:ident| $body:expr) => {{
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut client = $app.pool.get().await?;
            let $tx = client.transaction().await?;
            let result: Result<_, AppError> = async { $body }.await;
            match result {
                Ok(value) => {
                    // The commit may have happened even if we hear an error: callers must
                    // not undo side effects (blobs) on this one.
                    $tx.commit().await.map_err(|error| AppError::CommitOutcomeUnknown(error.to_string()))?;
                    break Ok::<_, AppError>(value);
                }
                Err(error) if error.is_retryable_conflict() && attempt < $crate::app::MAX_ATTEMPTS => {
                    // Roll back first: the locks and the connection are not held while
                    // waiting. Then back off a little, with jitter.
                    drop($tx);
                    drop(client);
                    let millis = rand::random::<u64>() % (2u64 << attempt);
                    tokio::time::sleep(std::time::Duration::from_millis(millis)).await;
                    continue;
                }
                Err(error) => break Err(error),
            }
        }
    }};
}

pub mod archives;
pub mod cleanup;
mod faults;
pub mod jobs;
mod read_cache;
mod recorder;
pub mod sessions;
pub mod uploads;

pub use faults::{caused_by_io, database_unavailable, RETRY_AFTER_SECONDS};

/// The application: shared by every request handler and consumer.
#[derive(Clone)]
pub struct App {
    pub pool: Pool,
    pub blobs: BlobStore,
    pub auth: Arc<Authenticator>,
    pub asset_token_ttl: i64,
    /// Commands running on their own (see [`App::run_to_completion`]); shutdown waits
    /// for them.
    pub commands: tokio_util::task::TaskTracker,
    uploads: recorder::UploadRecorder,
    /// Sessions recently found by [`App::precheck_upload`]: see there.
    upload_sessions: moka::sync::Cache<i64, SessionDetails>,
    /// Asset and session records for reads, dropped as soon as they change.
    pub read_cache: read_cache::ReadCache,
    /// What the relay and the command consumer report of the broker (for `/ready`).
    pub messaging: Arc<MessagingStatus>,
    /// The process's metrics (for `/metrics`); one set, shared by every clone.
    pub metrics: crate::metrics::Metrics,
    /// How long a two-phase upload waits for its bytes and its commit before it expires.
    pub upload_ttl: std::time::Duration,
    /// OpenTera mode: its Redis and TeraServer (see `crate::opentera`); none otherwise.
    pub opentera: Option<crate::opentera::OpenTera>,
}

/// The broker connection and what uses it, as `/ready` shows them.
#[derive(Debug, Default)]
pub struct MessagingStatus {
    broker: std::sync::atomic::AtomicU8,
    relay: std::sync::atomic::AtomicU8,
    commands: std::sync::atomic::AtomicU8,
    workers: std::sync::atomic::AtomicU8,
}

/// One component's state, as `/ready` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ComponentState {
    /// Not run by this process.
    Disabled = 0,
    /// Trying to reach the broker.
    Connecting = 1,
    /// Connected, but another process's relay publishes.
    Standby = 2,
    /// Connected and working.
    Up = 3,
    /// Connected, but the broker refuses publishing for now (its resource alarm).
    Blocked = 4,
}

impl ComponentState {
    fn from_u8(value: u8) -> Self {
        match value {
            1 => Self::Connecting,
            2 => Self::Standby,
            3 => Self::Up,
            4 => Self::Blocked,
            _ => Self::Disabled,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::Connecting => "connecting",
            Self::Standby => "standby",
            Self::Up => "up",
            Self::Blocked => "blocked",
        }
    }
}

impl MessagingStatus {
    pub fn set_broker(&self, state: ComponentState) {
        self.broker.store(state as u8, std::sync::atomic::Ordering::Relaxed);
    }
    pub fn broker(&self) -> ComponentState {
        ComponentState::from_u8(self.broker.load(std::sync::atomic::Ordering::Relaxed))
    }
    pub fn set_relay(&self, state: ComponentState) {
        self.relay.store(state as u8, std::sync::atomic::Ordering::Relaxed);
    }
    pub fn set_commands(&self, state: ComponentState) {
        self.commands.store(state as u8, std::sync::atomic::Ordering::Relaxed);
    }
    pub fn set_workers(&self, state: ComponentState) {
        self.workers.store(state as u8, std::sync::atomic::Ordering::Relaxed);
    }
    pub fn workers(&self) -> ComponentState {
        ComponentState::from_u8(self.workers.load(std::sync::atomic::Ordering::Relaxed))
    }
    pub fn relay(&self) -> ComponentState {
        ComponentState::from_u8(self.relay.load(std::sync::atomic::Ordering::Relaxed))
    }
    pub fn commands(&self) -> ComponentState {
        ComponentState::from_u8(self.commands.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// How long an upload's early session check may reuse what an earlier one read.
const UPLOAD_SESSION_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(2);

impl App {
    /// Must be called on a Tokio runtime (it starts the upload recorder's workers).
    pub fn new(pool: Pool, blobs: BlobStore, auth: Authenticator, asset_token_ttl: i64) -> Self {
        let uploads = recorder::UploadRecorder::start(pool.clone());
        Self {
            pool,
            blobs,
            auth: Arc::new(auth),
            asset_token_ttl,
            commands: tokio_util::task::TaskTracker::new(),
            uploads,
            messaging: Arc::default(),
            metrics: crate::metrics::Metrics::new(),
            upload_sessions: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(UPLOAD_SESSION_CACHE_TTL)
                .build(),
            read_cache: read_cache::ReadCache::default(),
            upload_ttl: std::time::Duration::from_secs(24 * 3600),
            opentera: None,
        }
    }

    /// Runs a command that has effects outside the database (blob writes and removals)
    /// in a task of its own and waits for it: a client that goes away drops the request's
    /// future, which must not stop such a command between its event and its bytes.
    /// Shutdown waits for these tasks (see `http::serve`).
    pub async fn run_to_completion<T: Send + 'static>(
        &self,
        command: impl std::future::Future<Output = Result<T, AppError>> + Send + 'static,
    ) -> Result<T, AppError> {
        self.commands.spawn(command).await.map_err(|error| AppError::TaskFailed(error.to_string()))?
    }

    // ----- sessions -----

    /// Registers or updates a session (services and superadmins).
    pub async fn upsert_session(
        &self,
        principal: &Principal,
        ctx: &CommandContext,
        command: UpsertSession,
    ) -> Result<SessionInfo, AppError> {
        if !principal.is_service() {
            return Err(AppError::Forbidden("only services may register sessions".into()));
        }
        let id = command.id_session;
        let session = in_transaction!(self, |tx| {
            receive_once(&tx, ctx, &id.stream()).await?;
            let upsert = SessionCommand::Upsert { command: command.clone(), new_uuid: Uuid::new_v4() };
            stage::<Session>(&tx, ctx, &id.stream(), upsert).await?;
            read::session(&tx, id).await?.ok_or(AppError::Domain(DomainError::NotFound("session")))
        });
        self.upload_sessions.invalidate(&id.get());
        self.read_cache.forget_session(id.get());
        session
    }

    /// Deletes a session: in one transaction, `SessionDeleted`, its unfinished jobs
    /// cancelled, its uploads not yet committed expired, and a job (`purge_session`)
    /// queued that deletes its assets in batches (see [`App::purge_session`]). Returns
    /// that job. From this moment the session's assets are out of reach of its members
    /// (the session is gone); the job takes them out of listings and removes their bytes.
    pub async fn delete_session(
        &self,
        principal: &Principal,
        ctx: &CommandContext,
        id: SessionId,
        policy: jobs::JobPolicy,
    ) -> Result<Uuid, AppError> {
        if !principal.is_service() {
            return Err(AppError::Forbidden("only services may delete sessions".into()));
        }
        let purge_job = Uuid::new_v4();
        let (cancelled_jobs, upload_bytes) = in_transaction!(self, |tx| {
            receive_once(&tx, ctx, &id.stream()).await?;
            stage::<Session>(&tx, ctx, &id.stream(), SessionCommand::Delete).await?;
            // Its unfinished jobs go with it (a running import stops and leaves nothing;
            // an earlier purge of the same id is taken over by this one).
            let jobs = read::unfinished_session_jobs(&tx, id).await?;
            for job in &jobs {
                let cancel = crate::domain::job::JobCommand::Cancel(principal.actor());
                let (state, _) =
                    stage_unlocked::<crate::domain::job::Job>(&tx, ctx, &jobs::job_stream(*job), cancel).await?;
                // An upload being imported is given back, to go with the others below.
                jobs::upload_follows_job(&tx, ctx, *job, &state).await?;
                archives::archive_follows_job(&tx, ctx, *job, &state, false).await?;
            }
            // Its uploads not yet committed go too (a signed URL can no longer fill them).
            let mut upload_bytes = Vec::new();
            for upload in read::open_session_uploads(&tx, id).await? {
                let discard = crate::domain::upload::UploadCommand::Discard;
                let stream = uploads::upload_stream(upload);
                let (state, events) =
                    stage_unlocked::<crate::domain::upload::Upload>(&tx, ctx, &stream, discard).await?;
                upload_bytes.extend(state.received.filter(|_| !events.is_empty()).map(|received| received.blob));
            }
            let queued = crate::domain::job::JobQueued {
                job_uuid: purge_job,
                kind: crate::domain::job::JobKind::PurgeSession,
                id_session: Some(id),
                requested_by: principal.actor(),
                max_attempts: policy.max_attempts.max(1),
                import: None,
                archive_uuid: None,
            };
            let queue = crate::domain::job::JobCommand::Queue(Box::new(queued));
            stage::<crate::domain::job::Job>(&tx, ctx, &jobs::job_stream(purge_job), queue).await?;
            Ok((jobs, upload_bytes))
        })?;
        self.upload_sessions.invalidate(&id.get());
        self.read_cache.forget_session(id.get());
        for job in cancelled_jobs {
            self.discard_import_bytes(job).await;
        }
        for location in &upload_bytes {
            self.remove_upload_bytes(location).await;
        }
        Ok(purge_job)
    }

    /// The early check of an upload, before its bytes are received: is the session there
    /// and does it admit `principal`? Only an answer of yes is remembered, for a couple of
    /// seconds, so a burst of uploads to one session costs one query rather than one each
    /// (at thousands of uploads a second that query was a third of the database's work).
    /// Safe because this check only decides whether to start receiving: the upload is
    /// recorded only if the session admits it then, read under a lock (see
    /// [`App::store_upload`]). A "no" is never remembered, so a session registered a
    /// moment ago is found at once.
    pub async fn precheck_upload(&self, principal: &Principal, id: SessionId) -> Result<(), AppError> {
        if self.upload_sessions.get(&id.get()).is_some_and(|details| details.grants(principal)) {
            return Ok(());
        }
        let details = self.session_for(principal, id).await?.details().ok_or(DomainError::NotFound("session"))?;
        self.upload_sessions.insert(id.get(), details);
        Ok(())
    }

    /// The session, if `principal` may see it.
    pub async fn session_for(&self, principal: &Principal, id: SessionId) -> Result<SessionInfo, AppError> {
        let client = self.pool.get().await?;
        let session = read::session(&client, id).await?.ok_or(DomainError::NotFound("session"))?;
        if !session.details().is_some_and(|d| d.grants(principal)) {
            return Err(AppError::Forbidden(format!("no access to session {id}")));
        }
        Ok(session)
    }

    pub async fn session_assets(
        &self,
        principal: &Principal,
        id: SessionId,
        directory: Option<&str>,
        cursor: Option<ListingCursor>,
        limit: i64,
    ) -> Result<Vec<AssetInfo>, AppError> {
        let session = self.session_for(principal, id).await?;
        let client = self.pool.get().await?;
        Ok(read::session_assets(&client, id, session.registered_position, directory, cursor, limit).await?)
    }

    // ----- assets -----

    /// Makes an uploaded file durable under its key and records the asset that
    /// `describe` makes of it (see [`recorder`]). The session must still exist and still
    /// admit `principal`: both are checked again, under a lock on the session row,
    /// because either may have changed while the bytes were streaming. If the asset is not recorded, its bytes
    /// are removed (unless the commit's outcome is unknown: then the cleanup job decides).
    pub async fn store_upload(
        &self,
        principal: &Principal,
        ctx: &CommandContext,
        blob: TempBlob,
        describe: impl FnOnce(StoredBlob) -> AssetUploaded,
    ) -> Result<AssetInfo, AppError> {
        let stored = blob.persist().await?;
        let location = stored.location.clone();
        let uploaded = describe(stored);
        // Recorded together with whichever other uploads are waiting (group commit).
        let recorded = self.uploads.record(principal.clone(), ctx.clone(), uploaded).await;
        if let Err(error) = &recorded {
            if !matches!(error, AppError::CommitOutcomeUnknown(_)) {
                self.remove_blob(&location).await;
            }
        }
        recorded
    }

    /// The asset, if `principal` may reach it through its session or `access_token`.
    /// Deleted assets are found too (their info says so); callers that need the bytes
    /// check [`AssetInfo::is_available`].
    pub async fn asset_for(
        &self,
        principal: &Principal,
        uuid: Uuid,
        access_token: Option<&str>,
    ) -> Result<AssetInfo, AppError> {
        // Without a database round trip when both records are kept (see `read_cache`).
        if let Some(asset) = self.read_cache.asset(uuid) {
            if principal.is_privileged() {
                return Ok(asset);
            }
            if let Some(session) = self.read_cache.session(asset.id_session) {
                self.asset_access(principal, &asset, Some(&session), access_token)?;
                return Ok(asset);
            }
        }
        let generation = self.read_cache.generation();
        let client = self.pool.get().await?;
        let asset = read::asset(&client, uuid).await?.ok_or(DomainError::NotFound("asset"))?;
        let session = if principal.is_privileged() { None } else { session_of(&client, &asset).await? };
        self.read_cache.fill(generation, &asset, session.as_ref());
        self.asset_access(principal, &asset, session.as_ref(), access_token)?;
        Ok(asset)
    }

    /// The asset a signed URL names (the URL is the permission): only while available.
    pub async fn asset_by_url(&self, uuid: Uuid) -> Result<AssetInfo, AppError> {
        let asset = match self.read_cache.asset(uuid) {
            Some(asset) => asset,
            None => {
                let client = self.pool.get().await?;
                read::asset(&client, uuid).await?.ok_or(DomainError::NotFound("asset"))?
            }
        };
        if !asset.is_available() {
            return Err(DomainError::NotFound("asset").into());
        }
        Ok(asset)
    }

    /// Several assets at once; every one must exist and be reachable.
    pub async fn assets_for(
        &self,
        principal: &Principal,
        requested: &[(Uuid, Option<String>)],
    ) -> Result<Vec<AssetInfo>, AppError> {
        let client = self.pool.get().await?;
        let uuids: Vec<Uuid> = requested.iter().map(|(uuid, _)| *uuid).collect();
        let found: std::collections::HashMap<Uuid, AssetInfo> =
            read::assets(&client, &uuids).await?.into_iter().map(|a| (a.asset_uuid, a)).collect();
        // Each session read once, however many of its assets are asked for.
        let mut sessions: std::collections::HashMap<i64, Option<SessionInfo>> = Default::default();
        let mut infos = Vec::with_capacity(requested.len());
        for (uuid, token) in requested {
            let asset = found.get(uuid).ok_or(DomainError::NotFound("asset"))?;
            if !principal.is_privileged() && !sessions.contains_key(&asset.id_session) {
                sessions.insert(asset.id_session, session_of(&client, asset).await?);
            }
            let session = sessions.get(&asset.id_session).and_then(Option::as_ref);
            self.asset_access(principal, asset, session, token.as_deref())?;
            infos.push(asset.clone());
        }
        Ok(infos)
    }

    /// The access rule for one asset: privileged principals reach every asset; members
    /// reach the assets of the session's current registration (not those of an earlier
    /// registration of the same id, deleted with it); an `access_token` opens a live asset
    /// it names to anyone, for as long as the one who asked for the token could still
    /// reach it (a token grants what its requester could do when it is used, within its
    /// lifetime). A bad token is reported only if the caller is not let in anyway.
    fn asset_access(
        &self,
        principal: &Principal,
        asset: &AssetInfo,
        session: Option<&SessionInfo>,
        access_token: Option<&str>,
    ) -> Result<(), AppError> {
        if principal.is_privileged() {
            return Ok(());
        }
        let admits =
            |who: &Principal| session.is_some_and(|s| s.owns(asset) && s.details().is_some_and(|d| d.grants(who)));
        if admits(principal) {
            return Ok(());
        }
        let Some(token) = access_token.filter(|t| !t.is_empty()) else {
            return Err(AppError::Forbidden(format!("no access to asset {}", asset.asset_uuid)));
        };
        Err(match self.auth.asset_grant(token) {
            Ok(grant) if !grant.names(asset.asset_uuid) => {
                AppError::Forbidden("the access_token does not name this asset".into())
            }
            // What a token opens ends with the asset: its infos and history too.
            Ok(_) if !asset.is_available() => AppError::Domain(DomainError::NotFound("asset")),
            Ok(grant) if grant.requester.is_privileged() || admits(&grant.requester) => return Ok(()),
            Ok(_) => AppError::Forbidden("the access_token's requester no longer has access to this asset".into()),
            Err(TokenError::Expired) => AppError::AccessTokenExpired("the access_token has expired".into()),
            Err(_) => AppError::Forbidden("the access_token is invalid".into()),
        })
    }

    pub async fn rename_asset(
        &self,
        principal: &Principal,
        ctx: &CommandContext,
        uuid: Uuid,
        access_token: Option<&str>,
        new_name: FileName,
    ) -> Result<AssetInfo, AppError> {
        self.asset_for(principal, uuid, access_token).await?;
        let renamed = in_transaction!(self, |tx| {
            stage::<Asset>(&tx, ctx, &asset_stream(uuid), AssetCommand::Rename(new_name.clone())).await?;
            read::asset(&tx, uuid).await?.ok_or(AppError::Domain(DomainError::NotFound("asset")))
        });
        // Also when the outcome is unknown: it may have committed.
        self.read_cache.forget_asset(uuid);
        renamed
    }

    /// Appends `AssetDeleted`, then removes the bytes.
    pub async fn delete_asset(
        &self,
        principal: &Principal,
        ctx: &CommandContext,
        uuid: Uuid,
        access_token: Option<&str>,
    ) -> Result<(), AppError> {
        let asset = self.asset_for(principal, uuid, access_token).await?;
        let deleted = in_transaction!(self, |tx| {
            stage::<Asset>(&tx, ctx, &asset_stream(uuid), AssetCommand::Delete(DeletionReason::Requested)).await?;
            Ok(())
        });
        self.read_cache.forget_asset(uuid);
        deleted?;
        self.remove_blob(&asset.blob_location()).await;
        Ok(())
    }

    /// The asset's events, oldest first (the audit trail).
    pub async fn asset_history(
        &self,
        principal: &Principal,
        uuid: Uuid,
        access_token: Option<&str>,
    ) -> Result<Vec<RecordedEvent>, AppError> {
        self.asset_for(principal, uuid, access_token).await?;
        let client = self.pool.get().await?;
        Ok(eventstore::read_stream(&client, &asset_stream(uuid), 0).await?)
    }

    /// An access token for the asset, asked for by `requester` (see
    /// [`App::asset_access`] for what it grants).
    pub fn asset_token(&self, uuid: Uuid, requester: &Principal) -> String {
        self.auth.mint_asset_token(&[uuid], requester, self.asset_token_ttl)
    }

    async fn remove_blob(&self, location: &BlobLocation) {
        if let Err(error) = self.blobs.remove(location).await {
            let key = &location.key;
            tracing::warn!(key, %error, "could not remove a deleted asset's bytes; the cleanup job will retry");
        }
    }

    /// Events committed but not yet published by the relay, and the age in seconds of
    /// the oldest of them (0 when none), for `/metrics`.
    pub async fn relay_lag(&self) -> Result<(i64, f64), AppError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "SELECT count(*), coalesce(extract(epoch FROM now() - min(e.recorded_at))::float8, 0)
                 FROM events e
                 WHERE (e.tx, e.position) > (
                     coalesce((SELECT c.tx FROM checkpoints c WHERE c.name = 'relay'), '0'::xid8),
                     coalesce((SELECT c.position FROM checkpoints c WHERE c.name = 'relay'), 0))",
                &[],
            )
            .await?;
        Ok((row.get(0), row.get(1)))
    }

    /// Whether the database answers (for `/ready`).
    pub async fn database_ready(&self) -> bool {
        let check = async {
            let client = self.pool.get().await.ok()?;
            client.simple_query("SELECT 1").await.ok()
        };
        matches!(tokio::time::timeout(std::time::Duration::from_secs(2), check).await, Ok(Some(_)))
    }
}
